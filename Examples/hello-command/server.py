"""A plain HTTP server with no Apus-specific code: it only honours $APUS_PORT and SIGTERM."""

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def _reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # drain the request body so the connection can be reused
        body = ("hello from a plain HTTP server\n" + self.path + "\n").encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _reply

    def log_message(self, format, *args):
        pass  # no access log


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    port = int(os.environ.get("APUS_PORT", "8000"))
    server = Server(("127.0.0.1", port), Hello)

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, so call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()
    server.server_close()
    print("stopped", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
