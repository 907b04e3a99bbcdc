"""Helpers for the sidecar integration tests: the `apus-sidecar` binary with a YAML config, downstream test
services (sidecar_backends.py) as killable processes, free ports, and small HTTP clients."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("APUS_BIN_DIR", REPO / ".build" / "debug"))
SIDECAR_BIN = BIN_DIR / "apus-sidecar"
BACKENDS = Path(__file__).resolve().parent / "sidecar_backends.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Backend:
    """One downstream endpoint (HTTP or gRPC) in its own process."""

    def __init__(self, kind: str, name: str, port: int | None = None):
        self.kind, self.name = kind, name
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Backend":
        self.proc = subprocess.Popen([sys.executable, str(BACKENDS), self.kind, str(self.port), self.name],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"backend {self.name} did not start: {line!r}"
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def endpoint(self, **extra) -> dict:
        return {"address": "127.0.0.1", "port": self.port, "protocol": self.kind, **extra}


class Sidecar:
    """`apus-sidecar --registry static --config FILE` (or another `registry`) with every port 0 (the bound ports come
    back on stdout)."""

    def __init__(self, tmp: Path, config: dict, args: list[str] | None = None, registry: str = "static"):
        self.registry = registry
        self.tmp = Path(tmp)
        self.config_path = self.tmp / "sidecar.yaml"
        self.log_path = self.tmp / "sidecar.log"
        self.write_config(config)
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}

    def write_config(self, config: dict) -> None:
        # JSON is YAML: the sidecar reads it with its YAML parser.
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> "Sidecar":
        argv = [str(SIDECAR_BIN), "--registry", self.registry, "--config", str(self.config_path),
                "--outbound-port", "0", "--admin-port", "0", *self.args]
        self.log = open(self.log_path, "w")
        env = dict(os.environ)
        # Against an apusd of these tests, the sidecar calls the registry API with that apusd's admin token (as
        # apusd hands the sidecars it starts a registry:<service> token).
        from apus_testlib import API_TOKENS
        if self.registry in API_TOKENS:
            env["APUS_REGISTRY_TOKEN"] = API_TOKENS[self.registry]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("apus-sidecar ready "), f"sidecar did not start: {line!r}\n{self.log_tail()}"
        self.ports = json.loads(line[len("apus-sidecar ready "):])
        return self

    @property
    def outbound(self) -> int:
        return self.ports["outbound"]

    @property
    def inbound(self) -> int:
        return self.ports["inbound"]

    @property
    def admin(self) -> int:
        return self.ports["admin"]

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def upstreams(self) -> dict:
        status, _, body = http_request(self.admin, "GET", "/upstreams")
        assert status == 200
        return {u["name"]: u for u in json.loads(body)["upstreams"]}

    def endpoint_state(self, upstream: str, port: int) -> dict:
        for e in self.upstreams()[upstream]["endpoints"]:
            if e["port"] == port:
                return e
        raise KeyError(port)

    def metrics(self) -> str:
        return http_request(self.admin, "GET", "/metrics")[2].decode()


def http_request(port: int, method: str, path: str, host: str | None = None, headers: dict | None = None,
                 body: bytes | None = None, timeout: float = 10.0):
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = dict(headers or {})
        if host:
            h["Host"] = host
        conn.request(method, path, body=body, headers=h)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(port: int, path: str, host: str, **kwargs):
    status, headers, body = http_request(port, "GET", path, host=host, **kwargs)
    return status, json.loads(body) if body else None


def parallel(n: int, fn) -> list:
    results: list = [None] * n

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported to the test as a value
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
