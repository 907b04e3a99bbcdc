import os


def handler(event, context):
    return {"version": context.function_version, "marker": os.environ.get("MARKER", "")}
