"""Returns every response shape the Python runtime supports, chosen by path; also reports its rlimits."""
import base64


def limits():
    out = {}
    with open("/proc/self/limits") as f:
        for line in f:
            if line.startswith("Max address space") or line.startswith("Max open files"):
                parts = line.split()
                out[" ".join(parts[:3])] = parts[3]
    return out


def handler(event, context):
    path = event["path"]
    if path == "/str":
        return "plain text"
    if path == "/bytes":
        return b"\x00\x01\xff"
    if path == "/dict":
        return {"a": 1}
    if path == "/list":
        return [1, 2, 3]
    if path == "/none":
        return None
    if path == "/response":
        return {"statusCode": 201, "headers": {"X-Custom": "yes", "Content-Type": "text/csv"}, "body": "a,b\n"}
    if path == "/b64":
        return {"statusCode": 200, "body": base64.b64encode(b"\xde\xad\xbe\xef").decode(), "isBase64Encoded": True,
                "headers": {"Content-Type": "application/octet-stream"}}
    if path == "/raise":
        raise ValueError("boom on purpose")
    if path == "/limits":
        return limits()
    if path == "/alloc":
        megabytes = int(event["query"].get("mb", "1"))
        block = bytearray(megabytes * 1024 * 1024)
        return {"allocated": len(block)}
    return {"method": event["method"], "path": path, "query": event["query"], "body": event["body"],
            "isBase64Encoded": event["isBase64Encoded"], "contentType": event["headers"].get("content-type")}
