import os

GREETING = os.environ.get("GREETING", "Hello")


def handler(event, context):
    name = event["query"].get("name", "world")
    print(f"greeting {name!r} ({event['method']} {event['path']}, request {context.request_id})")
    return {
        "message": f"{GREETING}, {name}!",
        "version": context.function_version,
        "method": event["method"],
        "path": event["path"],
    }
