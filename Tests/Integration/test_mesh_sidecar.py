"""`mesh.sidecar: true`: apusd starts the sidecar beside each instance with the CLI contract of `apus-sidecar`,
gives the instance `APUS_SIDECAR`, and stops the sidecar with its instance. The sidecar here is a stand-in
(`--sidecar-binary`) that records its argv and answers HTTP on its outbound port, so the test holds for the real
apus-sidecar's contract too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from apus_testlib import Apusd
from registry_support import pid_alive, wait_until

STAND_IN = r'''#!/usr/bin/env python3
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
opts = {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--") and not argv[i + 1].startswith("--")}
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "sidecar-%s.json" % opts["instance-id"]), "w") as f:
    json.dump({"argv": argv, "pid": os.getpid()}, f)

class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        out = json.dumps({"sidecar": True, "host": self.headers.get("Host"), "path": self.path,
                          "service": opts["service"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

server = ThreadingHTTPServer((opts.get("outbound-address", "127.0.0.1"), int(opts["outbound-port"])), Proxy)
server.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown, daemon=True).start())
print("stand-in sidecar for %s on %s" % (opts["service"], opts["outbound-port"]), flush=True)
server.serve_forever()
'''

# The function: on GET /call it calls another mesh service through $APUS_SIDECAR, naming it in Host.
CALLER = r'''
import json, os, signal, threading, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Caller(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        sidecar = os.environ.get("APUS_SIDECAR")
        reply = None
        if sidecar and self.path.startswith("/call"):
            req = urllib.request.Request(sidecar + "/items?n=2", headers={"Host": "orders.list"})
            with urllib.request.urlopen(req, timeout=5) as r:
                reply = json.loads(r.read())
        out = json.dumps({"sidecarEnv": sidecar, "port": os.environ["APUS_PORT"],
                          "instance": os.environ["APUS_INSTANCE"], "reply": reply}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["APUS_PORT"])), Caller)
server.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown, daemon=True).start())
server.serve_forever()
'''


def write_caller(dst: Path, name: str, service: str) -> Path:
    dst.mkdir(parents=True)
    (dst / "server.py").write_text(CALLER)
    (dst / "apus.yaml").write_text(
        f"name: {name}\nruntime: command\ncommand: [\"python3\", \"server.py\"]\nconcurrency: 4\n"
        f"mesh: {{service: {service}, sidecar: true}}\n")
    return dst


def test_sidecar_started_beside_each_instance_with_the_contract(tmp_path):
    sidecar_dir = tmp_path / "sidecar"
    sidecar_dir.mkdir()
    stand_in = sidecar_dir / "apus-sidecar"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    d = Apusd(tmp_path / "apusd", extra_args=("--sidecar-binary", str(stand_in)))
    try:
        d.start()
        d.deploy(write_caller(tmp_path / "fn", "side-caller", "side.caller"))
        r = d.get("/side-caller/call")
        assert r.status == 200, r
        seen = r.json()
        # The instance reached its sidecar through APUS_SIDECAR, naming the upstream service in Host.
        assert seen["reply"] == {"sidecar": True, "host": "orders.list", "path": "/items?n=2", "service": "side.caller"}, seen
        record = json.loads((sidecar_dir / f"sidecar-{seen['instance']}.json").read_text())
        outbound_host, outbound = seen["sidecarEnv"].removeprefix("http://").rsplit(":", 1)
        instance = next(i for i in d.api_json("GET", "/v1/functions/side-caller/instances")["instances"]
                        if i["id"] == seen["instance"])
        if (d.info.get("sandboxLayers") or {}).get("network"):
            # Its own network namespace: the sidecar listens on apusd's end of the instance's link, port 15001, and
            # reaches the instance at its address there.
            assert outbound == "15001" and outbound_host.startswith("10.213."), seen
            assert instance["address"].startswith("10.213.") and instance["address"] != outbound_host, instance
        else:
            assert outbound_host == "127.0.0.1" and instance["address"] == "127.0.0.1", (seen, instance)
        argv = record["argv"]
        inbound = argv[argv.index("--inbound-port") + 1]
        assert argv == ["--registry", d.api, "--outbound-address", outbound_host, "--outbound-port", outbound,
                        "--inbound-port", inbound, "--app-address", instance["address"], "--app-port", seen["port"],
                        "--app-protocol", "http", "--service", "side.caller", "--instance-id", seen["instance"],
                        "--no-register"], argv
        assert inbound.isdigit() and inbound not in (outbound, seen["port"])
        assert pid_alive(record["pid"])
        logs = d.cli_ok("logs", "side-caller")
        assert "[sidecar] stand-in sidecar for side.caller" in logs, logs

        # The sidecar goes with its instance.
        d.cli_ok("delete", "side-caller")
        wait_until(lambda: not pid_alive(record["pid"]), 10, "the sidecar outlived its instance")
    finally:
        d.teardown()


def test_instance_without_its_sidecar_does_not_start(tmp_path):
    d = Apusd(tmp_path / "apusd", extra_args=("--sidecar-binary", str(tmp_path / "no-such-sidecar")))
    try:
        d.start()
        d.deploy(write_caller(tmp_path / "fn", "side-missing", "side.missing"))
        r = d.get("/side-missing/call", timeout=30)
        assert r.status == 503, r
        assert "sidecar" in r.json()["error"]["message"], r
    finally:
        d.teardown()
