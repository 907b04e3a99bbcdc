"""Reports what an instance sees: its environment, code folder, memory limit and (with ?path=) a filesystem path.
Used to compare instances started from a prewarmed process with cold-started ones."""

import os
import resource

import helper  # a sibling module in the code folder

PREFIXES = ("APUS_", "PYTHON", "LD_", "MALLOC_")


def _snoop(path):
    listing, readable = None, False
    try:
        listing = sorted(os.listdir(path))[:50]
    except OSError:
        pass
    try:
        with open(path, "rb") as f:
            f.read(100)
        readable = True
    except OSError:
        pass
    return {"path": path, "exists": os.path.exists(path), "readable": readable, "listing": listing}


def handler(event, context):
    query = event["query"]
    if "path" in query:
        return _snoop(query["path"])
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    return {
        "env": {k: v for k, v in os.environ.items() if k.startswith(PREFIXES) or k in ("FOO", "HOME", "LANG")},
        "cwd": os.getcwd(),
        "code": sorted(os.listdir(".")),
        "helper": helper.MARKER,
        "memoryLimit": soft,
        "instance": context.instance_id,
        "version": context.function_version,
    }
