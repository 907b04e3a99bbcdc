"""Test function for asynchronous tasks: each path is one behaviour.

/echo           returns the payload, task id and attempt as JSON
/sleep?s=N      sleeps N seconds (reporting progress each second), then answers
/cooperate      reports progress every 0.2 s until told the task was cancelled, then stops
/ignore         sleeps 120 s without looking at anything
/crash          kills its instance (os._exit) before answering
/big?bytes=N    answers N bytes
/fail-once      fails (500) on attempt 1, succeeds after
/module         reports progress through `import apus` (the bootstrap's helper module)
"""

import json
import os
import time


def handler(event, context):
    path = event["path"]
    query = event["query"]
    if path == "/sleep":
        seconds = float(query.get("s", "1"))
        end = time.time() + seconds
        step = 0
        while time.time() < end:
            time.sleep(min(1.0, max(0.0, end - time.time())))
            step += 1
            context.report_progress(min(1.0, step / max(seconds, 1.0)), "slept %d s" % step)
        return {"slept": seconds, "task": context.task_id, "attempt": context.attempt}
    if path == "/cooperate":
        while context.report_progress(0.5, "working"):
            time.sleep(0.2)
        print("task %s: cancelled, stopping" % context.task_id, flush=True)
        return {"statusCode": 499, "body": "cancelled"}
    if path == "/ignore":
        time.sleep(120)
        return "done"
    if path == "/crash":
        os._exit(3)
    if path == "/big":
        return {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": "x" * int(query.get("bytes", "10"))}
    if path == "/module":
        import apus

        return {"continue": apus.report_progress(context.progress_url, 0.25, "via the apus module")}
    if path == "/fail-once":
        if context.attempt == 1:
            raise RuntimeError("first attempt fails")
        return {"attempt": context.attempt}
    return {
        "task": context.task_id,
        "attempt": context.attempt,
        "payload": event["body"],
        "method": event["method"],
        "path": path,
    }
