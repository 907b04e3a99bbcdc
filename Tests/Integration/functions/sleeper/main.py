import time


def handler(event, context):
    time.sleep(float(event["query"].get("sleep", "3")))
    return "done"
