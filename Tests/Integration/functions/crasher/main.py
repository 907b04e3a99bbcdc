import os
import sys


def handler(event, context):
    if event["path"] == "/crash":
        # The request has been read; die before any response byte is written.
        print(f"crashing on purpose (pid {os.getpid()})", flush=True)
        sys.stderr.flush()
        os._exit(3)
    return {"pid": os.getpid(), "ok": True}
