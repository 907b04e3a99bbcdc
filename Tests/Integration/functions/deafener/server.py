"""An instance that, on /deafen, stops listening but stays alive: the gateway's next connect is refused while the
process still looks healthy, the window between a crash and the moment its exit is noticed."""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        deafen = self.path == "/deafen"
        body = json.dumps({"pid": os.getpid(), "deafened": deafen}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if deafen:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        if deafen:
            threading.Thread(target=stop_listening, daemon=True).start()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.do_GET()

    def log_message(self, *args):
        pass


def stop_listening():
    server.shutdown()
    server.server_close()
    print(f"no longer listening (pid {os.getpid()})", flush=True)


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["APUS_PORT"])), Handler)
server.daemon_threads = True
server.serve_forever()
while True:
    time.sleep(3600)
