"""Reports what the function can see of the filesystem (used to prove the sandbox)."""

import os


def handler(event, context):
    result = {"cwd": os.getcwd(), "uid": os.getuid()}
    path = event["query"].get("path")
    if path is None:
        return result

    errors = []
    listing = None
    readable = False
    exists = os.path.exists(path)
    try:
        listing = sorted(os.listdir(path))[:20]
    except OSError as exc:
        errors.append(f"listdir: {type(exc).__name__}: {exc}")
    try:
        with open(path, "rb") as f:
            f.read(100)
        readable = True
    except OSError as exc:
        errors.append(f"open: {type(exc).__name__}: {exc}")

    result.update(
        {
            "path": path,
            "exists": exists,
            "readable": readable,
            "listing": listing,
            # A directory is not readable with open(); only report errors if nothing worked.
            "error": None if (readable or listing is not None) else "; ".join(errors),
        }
    )
    return result
