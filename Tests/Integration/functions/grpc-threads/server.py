"""apus.test.Threads/Hold on $APUS_PORT: holds the call for the milliseconds in the request body (ASCII digits,
default 300, at most 5000) so that concurrent calls occupy concurrent worker threads, then answers JSON: the
worker thread's name, how many calls were in flight at once at most, and the instance id.

Raw bytes in and out (generic handler), so no generated code is needed.
"""

import json
import os
import signal
import threading
import time
from concurrent import futures

import grpc

WORKERS = 64

_lock = threading.Lock()
_in_flight = 0
_max_in_flight = 0


def hold(request, context):
    global _in_flight, _max_in_flight
    millis = min(int(request or b"300"), 5000)
    with _lock:
        _in_flight += 1
        _max_in_flight = max(_max_in_flight, _in_flight)
    try:
        time.sleep(millis / 1000.0)
    finally:
        with _lock:
            _in_flight -= 1
            most = _max_in_flight
    return json.dumps({"thread": threading.current_thread().name, "maxInFlight": most,
                       "threads": threading.active_count(), "instance": os.environ.get("APUS_INSTANCE")}).encode()


handlers = grpc.method_handlers_generic_handler("apus.test.Threads", {
    "Hold": grpc.unary_unary_rpc_method_handler(hold),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="worker"),
                     options=[("grpc.so_reuseport", 0)])
server.add_generic_rpc_handlers((handlers,))
server.add_insecure_port("127.0.0.1:" + os.environ["APUS_PORT"])
server.start()
print(f"grpc-threads listening with {WORKERS} workers", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
while not stop.wait(0.5):
    pass
server.stop(2).wait()
