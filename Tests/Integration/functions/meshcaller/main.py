"""GET /?call=a,b calls each named mesh service's /hello through $APUS_SIDECAR (the name in Host) and returns
what each answered; ?method=POST sends a POST instead."""

import json
import os
import urllib.error
import urllib.request


def handler(event, context):
    sidecar = os.environ["APUS_SIDECAR"]
    method = event["query"].get("method", "GET")
    answers = {}
    for name in filter(None, event["query"].get("call", "").split(",")):
        request = urllib.request.Request(sidecar + "/hello", method=method, data=b"x" if method == "POST" else None,
                                         headers={"Host": name, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                answers[name] = {"status": reply.status, "body": json.loads(reply.read())}
        except urllib.error.HTTPError as error:
            answers[name] = {"status": error.code, "body": error.read().decode("utf-8", "replace")}
    return answers
