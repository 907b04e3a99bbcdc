"""Helpers for the service-registry tests: a real etcd (Debian's etcd-server) on loopback in a temp dir, its JSON
gateway (base64 keys and values), the registry API of apusd, and function directories that join the mesh.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from apus_testlib import Response, http_request, write_headecho

ETCD = shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class Etcd:
    """One etcd member on loopback over a temp data dir; restartable, optionally with its data wiped."""

    def __init__(self, workdir: Path):
        if ETCD is None:
            pytest.skip("etcd is not installed (Scripts/install-deps installs etcd-server)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def registry_url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0):
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [ETCD, "--name", "apus-test", "--data-dir", str(self.data_dir),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"apus-test={peer}", "--log-level", "warn"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}"
            try:
                self.call("/v3/kv/range", {"key": b64("/")}, timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"etcd did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def restart(self, wipe: bool):
        """Stop; with wipe, lose every key and lease (a replaced member); start again on the same ports."""
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no etcd log)"

    # ---- JSON gateway

    def call(self, path: str, body: dict, timeout: float = 5.0) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode().splitlines()[0])

    def prefix(self, prefix: str) -> dict:
        """key -> (decoded JSON value, lease id) for every key under prefix."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        reply = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        return {unb64(kv["key"]): (json.loads(unb64(kv["value"])), kv.get("lease", "0")) for kv in reply.get("kvs", [])}

    def service(self, service: str) -> dict:
        """endpoint id -> (endpoint JSON, lease) for one mesh service, read straight from etcd."""
        prefix = f"/apus/services/{service}/"
        return {key[len(prefix):]: value for key, value in self.prefix(prefix).items()}

    def grant(self, ttl: int) -> str:
        return self.call("/v3/lease/grant", {"TTL": ttl})["ID"]

    def put(self, key: str, value: dict, lease: str | None = None):
        body = {"key": b64(key), "value": b64(json.dumps(value))}
        if lease:
            body["lease"] = lease
        self.call("/v3/kv/put", body)

    def lease_ttl(self, lease: str) -> int:
        return int(self.call("/v3/lease/timetolive", {"ID": lease}).get("TTL", "-1"))


# --------------------------------------------------------------------------------------------------------------
# The registry API


def registry_put(apusd, service: str, endpoint_id: str, body: dict) -> Response:
    return apusd.api_call("PUT", f"/v1/registry/services/{service}/endpoints/{endpoint_id}", body)


def register(apusd, service: str, endpoint_id: str, port: int = 7000, ttl: int = 10, **fields) -> dict:
    body = {"address": "127.0.0.1", "port": port, "protocol": "http", "ttlSeconds": ttl, **fields}
    r = registry_put(apusd, service, endpoint_id, body)
    assert r.status == 200, f"registration refused: {r!r}"
    lease = r.json()
    assert lease["service"] == service and lease["endpointID"] == endpoint_id and lease["ttlSeconds"] == ttl, lease
    assert lease["leaseID"], lease
    return lease


def heartbeat(apusd, lease: dict) -> Response:
    return apusd.api_call("POST", f"/v1/registry/leases/{lease['leaseID']}/heartbeat")


def resolve(apusd, service: str) -> dict:
    return apusd.api_json("GET", f"/v1/registry/services/{service}")


def endpoint_ids(apusd, service: str) -> list[str]:
    return [e["id"] for e in resolve(apusd, service)["endpoints"]]


def wait_until(predicate, timeout: float, message: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{message} (within {timeout}s; last: {last!r})")


def long_poll(apusd, service: str, index: int, wait: str = "10s", timeout: float = 30.0) -> tuple[dict, float]:
    start = time.monotonic()
    r = http_request(apusd.api, "GET", f"/v1/registry/services/{service}?watch=true&index={index}&wait={wait}",
                     timeout=timeout)
    assert r.status == 200, r
    assert r.header("X-Apus-Registry-Index") == str(r.json()["index"]), r
    return r.json(), time.monotonic() - start


# --------------------------------------------------------------------------------------------------------------
# Functions in the mesh


def mesh_headecho(dst: Path, name: str, service: str, sidecar: bool = False) -> Path:
    """The tests' header-echo HTTP function, registered in the mesh as `service`."""
    write_headecho(dst, name=name)
    with open(dst / "apus.yaml", "a") as f:
        f.write(f"mesh: {{service: {service}, sidecar: {'true' if sidecar else 'false'}}}\n")
    return dst


def mesh_grpc_echo(dst: Path, name: str, service: str) -> Path:
    """Examples/echo-python-grpc (serves echo.Echo), registered in the mesh as `service`."""
    from apus_testlib import EXAMPLES_DIR, copy_function
    copy_function(EXAMPLES_DIR / "echo-python-grpc", dst, name=name)
    with open(dst / "apus.yaml", "a") as f:
        f.write(f"mesh: {{service: {service}}}\n")
    return dst


def call_http_endpoint(endpoint: dict, service: str, path: str = "/hello?x=1") -> Response:
    """What an upstream does with a resolved HTTP endpoint: connect to it, name the service in Host."""
    assert endpoint["protocol"] == "http", endpoint
    return http_request(f"http://{endpoint['address']}:{endpoint['port']}", "GET", path, headers={"Host": service})


def call_grpc_endpoint(endpoint: dict, text: str = "hi") -> str:
    """What an upstream does with a resolved gRPC endpoint: a channel to address:port, call echo.Echo/Get."""
    import grpc
    from grpc_support import echo_stub, req
    assert endpoint["protocol"] == "grpc", endpoint
    with grpc.insecure_channel(f"{endpoint['address']}:{endpoint['port']}") as channel:
        return echo_stub(channel).Get(req(text=text), timeout=30).text


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False
