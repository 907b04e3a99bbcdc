"""Tracks how many requests this instance handles at once (to check per-instance concurrency limits)."""

import threading
import time

_lock = threading.Lock()
_in_flight = 0
_max_seen = 0


def handler(event, context):
    global _in_flight, _max_seen
    if event["path"] == "/max":
        with _lock:
            return {"instance": context.instance_id, "maxInFlight": _max_seen}

    seconds = float(event["query"].get("sleep", "0.2"))
    with _lock:
        _in_flight += 1
        now = _in_flight
        _max_seen = max(_max_seen, _in_flight)
    try:
        time.sleep(seconds)
    finally:
        with _lock:
            _in_flight -= 1
            max_seen = _max_seen
    return {"instance": context.instance_id, "inFlightNow": now, "maxInFlight": max_seen}
