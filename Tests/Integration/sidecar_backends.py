"""Downstream test services for the sidecar tests, run as their own processes so a test can kill one.

    python3 sidecar_backends.py http PORT NAME    HTTP/1.1 keep-alive server
    python3 sidecar_backends.py grpc PORT NAME    grpcio server for echo.Echo (IDL/examples/echo.proto)

HTTP paths: /status/NNN answers NNN; /sleep/MS answers after MS ms; /count?id=X says how many requests carried
`x-test-id: X`; /healthz answers 200; anything else echoes the request (server name, port, method, path, headers,
body) as JSON. gRPC Get echoes the call's metadata (and `time-remaining`) as JSON in `payload`, honours `sleep_ms` and
`fail_code`, and counts calls by `text` (`text: "count:X"` answers how many calls had text X, in `index`);
Collect joins the texts it receives, Update answers each message upper-cased.
Each prints "ready" once it listens.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve_http(port: int, name: str) -> None:
    seen: Counter = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, status: int, payload: dict) -> None:
            body = (json.dumps(payload) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                body = b"".join(chunks)
            test_id = self.headers.get("x-test-id")
            if test_id:
                with lock:
                    seen[test_id] += 1
            path = self.path
            if path.startswith("/count"):
                key = path.partition("id=")[2]
                with lock:
                    count = seen[key]
                self._answer(200, {"server": name, "count": count})
                return
            if path == "/healthz":
                self._answer(200, {"server": name, "ok": True})
                return
            if path.startswith("/status/"):
                self._answer(int(path.split("/")[2]), {"server": name, "port": port})
                return
            if path.startswith("/sleep/"):
                time.sleep(int(path.split("/")[2]) / 1000)
            self._answer(200, {
                "server": name, "port": port, "method": self.command, "path": path,
                "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body.decode(errors="replace"),
            })

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def serve_grpc(port: int, name: str) -> None:
    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Examples" / "echo-python-grpc"))
    import echo_pb2
    import echo_pb2_grpc

    calls: Counter = Counter()
    lock = threading.Lock()

    class Echo(echo_pb2_grpc.EchoServicer):
        def Get(self, request, context):
            if request.text.startswith("count:"):
                with lock:
                    return echo_pb2.EchoResponse(text=request.text, index=calls[request.text[6:]], served_by=name)
            with lock:
                calls[request.text] += 1
            if request.sleep_ms:
                time.sleep(request.sleep_ms / 1000)
            if request.fail_code:
                context.abort(grpc.StatusCode(_code(request.fail_code)), request.fail_message or "failed as asked")
            metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            # grpcio consumes grpc-timeout itself: report the deadline the call arrived with as time remaining.
            metadata["time-remaining"] = context.time_remaining()
            return echo_pb2.EchoResponse(text=request.text, served_by=name, instance=str(port),
                                         payload=json.dumps(metadata).encode())

        def Expand(self, request, context):
            for i in range(request.repeat):
                yield echo_pb2.EchoResponse(text=request.text, index=i, served_by=name)

        def Collect(self, requests, context):
            texts = [r.text for r in requests]
            return echo_pb2.EchoResponse(text="+".join(texts), index=len(texts), served_by=name)

        def Update(self, requests, context):
            for i, r in enumerate(requests):
                yield echo_pb2.EchoResponse(text=r.text.upper(), index=i, served_by=name)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def _code(number: int):
    import grpc
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


if __name__ == "__main__":
    kind, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    (serve_http if kind == "http" else serve_grpc)(port, name)
