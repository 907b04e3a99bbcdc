"""The mesh end to end, with real parts: apusd with its embedded registry, a function with `mesh.sidecar: true`
whose instances get a real `apus-sidecar` (resolving names through apusd's registry API), and two downstream test
services registered under their names. The function calls both by name through its sidecar; when one endpoint of
a service dies, its share moves to the other endpoint with no failed idempotent call, and the sidecar ejects it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from apus_testlib import APUSD, FUNCTIONS_DIR, Apusd
from registry_support import register, wait_until

SIDECAR = APUSD.parent / "apus-sidecar"


DOWNSTREAM = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
service = sys.argv[1]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"service": service, "port": self.server.server_address[1], "method": self.command,
                           "traceparent": self.headers.get("traceparent")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
'''


class Downstream:
    """A test service endpoint in its own process (killed for real by `kill`): answers /hello with its service
    name, its port, the method and the trace header it saw."""

    def __init__(self, service: str):
        self.service = service
        self.proc = subprocess.Popen([sys.executable, "-c", DOWNSTREAM, service], stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def mesh(tmp_path):
    if not SIDECAR.exists():
        pytest.fail(f"{SIDECAR} not built (swift build builds apus-sidecar)")
    daemon = Apusd(tmp_path / "apusd")
    services = [Downstream("svc.alpha"), Downstream("svc.alpha"), Downstream("svc.beta")]
    try:
        daemon.start()
        for i, d in enumerate(services):
            register(daemon, d.service, f"e{i}", port=d.port, ttl=120)
        daemon.deploy(FUNCTIONS_DIR / "meshcaller")
        yield daemon, services
    finally:
        daemon.teardown()
        for d in services:
            d.kill()


def call(daemon, query):
    r = daemon.get(f"/meshcaller/?{query}", timeout=30)
    assert r.status == 200, r
    return r.json()


@pytest.mark.timeout(120)
def test_function_calls_two_services_by_name_through_its_real_sidecar(mesh):
    daemon, (alpha1, alpha2, beta) = mesh
    answers = call(daemon, "call=svc.alpha,svc.beta")
    assert answers["svc.alpha"]["status"] == 200 and answers["svc.alpha"]["body"]["service"] == "svc.alpha", answers
    assert answers["svc.beta"]["status"] == 200 and answers["svc.beta"]["body"]["port"] == beta.port, answers
    # The caller's trace context reaches the downstream service.
    assert answers["svc.beta"]["body"]["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-"), answers
    # Both alpha endpoints share the load.
    ports = {call(daemon, "call=svc.alpha")["svc.alpha"]["body"]["port"] for _ in range(12)}
    assert ports == {alpha1.port, alpha2.port}, ports
    # The sidecar is the real one, started by apusd beside the instance and shown in the function's logs.
    logs = daemon.cli_ok("logs", "meshcaller")
    assert "[sidecar]" in logs or "apus-sidecar" in logs, logs[-2000:]
    # An unknown name is an error from the sidecar, not a hang.
    unknown = call(daemon, "call=svc.nowhere")["svc.nowhere"]
    assert unknown["status"] in (502, 503), unknown


@pytest.mark.timeout(120)
def test_dead_endpoint_share_moves_without_failed_idempotent_calls(mesh):
    daemon, (alpha1, alpha2, _) = mesh
    assert call(daemon, "call=svc.alpha")["svc.alpha"]["status"] == 200  # instance and sidecar up
    alpha1.kill()  # still registered (TTL 120 s): the sidecar has to find out itself
    answers = [call(daemon, "call=svc.alpha")["svc.alpha"] for _ in range(20)]
    assert [a["status"] for a in answers] == [200] * 20, answers
    assert {a["body"]["port"] for a in answers} == {alpha2.port}, "every call was served by the live endpoint"
    # A POST is not retried: after the ejection it goes to the live endpoint too, and succeeds.
    post = call(daemon, "call=svc.alpha&method=POST")["svc.alpha"]
    assert post["status"] == 200 and post["body"]["method"] == "POST", post
