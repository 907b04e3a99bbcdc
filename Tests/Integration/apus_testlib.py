"""Helpers for the Apus integration tests: run the real `apusd` and `apus` binaries, talk HTTP with the stdlib.

Only the standard library is used here (no requests); fixtures live in conftest.py.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import urllib.parse
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("APUS_BIN_DIR") or (REPO_ROOT / ".build" / "debug")).resolve()
APUSD = BIN_DIR / "apusd"
APUS = BIN_DIR / "apus"
FUNCTIONS_DIR = Path(__file__).resolve().parent / "functions"
EXAMPLES_DIR = REPO_ROOT / "Examples"

STARTUP_TIMEOUT = 60.0  # seconds to wait for ports.json and a first answer from the API
STOP_TIMEOUT = 15.0  # seconds apusd may take to exit after SIGTERM
IDLE_TIMEOUT = "3s"

# `2026-11-27T03:40:00.123Z v1 i-3f2a stdout| text`
LOG_LINE_RE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) v(?P<version>\d+) (?P<instance>\S+) "
    r"(?P<stream>stdout|stderr|apus)\| (?P<text>.*)$"
)


# --------------------------------------------------------------------------------------------------------------
# HTTP


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes, elapsed: float):
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise AssertionError(f"response is not JSON (status {self.status}): {self.text[:500]!r}") from exc

    def header(self, name: str, default=None):
        return self.headers.get(name, default)

    def __repr__(self) -> str:
        return f"<Response {self.status} {dict(self.headers)} {self.text[:300]!r}>"


# The admin token of every apusd these tests started, by its API URL: requests to that URL carry it unless they
# say otherwise (token=None, or an Authorization header of their own).
API_TOKENS: dict[str, str] = {}
AUTO = object()


def http_request(base_url: str, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 30.0, token=AUTO) -> Response:
    """One request on a fresh connection. A `Host` entry in headers replaces the automatic one. Requests to the API
    of an apusd started here carry its admin token (token=AUTO), another token (token="apus_…") or none (None)."""
    u = urllib.parse.urlsplit(base_url)
    if u.scheme == "https":
        # An API with --api-tls-cert (a test's self-signed certificate; tests that check it verify it themselves).
        import ssl
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = dict(headers or {})
    if token is AUTO:
        token = API_TOKENS.get(f"{u.scheme}://{u.netloc}")
    if token is not None and not any(k.lower() == "authorization" for k in headers):
        headers["Authorization"] = f"Bearer {token}"
    start = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, r.headers, data, time.monotonic() - start)
    finally:
        conn.close()


class KeepAliveClient:
    """A persistent HTTP/1.1 connection (one per thread). Reconnects once if the server closed an idle connection."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connections_opened = 0

    def _connect(self):
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self.connections_opened += 1

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Response:
        token = API_TOKENS.get(f"http://{self.host}:{self.port}")
        if token is not None and not any(k.lower() == "authorization" for k in (headers or {})):
            headers = {**(headers or {}), "Authorization": f"Bearer {token}"}
        for attempt in (1, 2):
            if self.conn is None:
                self._connect()
            start = time.monotonic()
            try:
                self.conn.request(method, path, body=body, headers=dict(headers or {}))
                r = self.conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server may close a kept-alive connection between requests; retry once on a new one.
                self.close()
                if attempt == 2:
                    raise
                continue
            if r.will_close:
                self.close()
            return Response(r.status, r.headers, data, time.monotonic() - start)
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def assert_error(resp: Response, status: int, code: str):
    """The JSON error envelope `{"error":{"code":..,"message":..}}` with the given status and code."""
    assert resp.status == status, f"expected {status} {code}, got {resp!r}"
    ctype = resp.header("Content-Type", "")
    assert "json" in ctype, f"error response is not JSON (Content-Type {ctype!r}): {resp!r}"
    doc = resp.json()
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), f"no error envelope: {doc!r}"
    assert doc["error"].get("code") == code, f"expected error code {code!r}: {doc!r}"
    assert isinstance(doc["error"].get("message"), str) and doc["error"]["message"], f"empty message: {doc!r}"
    return doc["error"]


# --------------------------------------------------------------------------------------------------------------
# Function directories


def manifest_name(func_dir: Path) -> str:
    text = (Path(func_dir) / "apus.yaml").read_text()
    m = re.search(r"^name:\s*['\"]?([a-z0-9-]+)", text, re.MULTILINE)
    assert m, f"no name in {func_dir}/apus.yaml"
    return m.group(1)


def copy_function(src: Path, dst: Path, name: str | None = None, subs: list | None = None) -> Path:
    """Copy a function dir, optionally renaming it and applying (regex, replacement) edits to apus.yaml."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    manifest = dst / "apus.yaml"
    text = manifest.read_text()
    if name is not None:
        text, n = re.subn(r"^name:.*$", f"name: {name}", text, count=1, flags=re.MULTILINE)
        assert n == 1
    for pattern, repl in subs or []:
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        assert n >= 1, f"{pattern!r} not found in {manifest}"
    manifest.write_text(text)
    return dst


def tar_gz_dir(func_dir: Path, prefix: str = "./") -> bytes:
    """The function dir as a gzip'd tar with apus.yaml at the archive root. The default "./" prefix gives the
    entry names of `tar -C DIR -czf - .` (what the CLI uploads); prefix="" gives bare names (`apus.yaml`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(Path(func_dir).rglob("*")):
            if "__pycache__" in p.parts:
                continue
            tar.add(p, arcname=prefix + str(p.relative_to(func_dir)), recursive=False)
    return buf.getvalue()


# A `runtime: command` function written by the tests themselves: a plain stdlib HTTP server that echoes what
# reached the instance (method, path, headers, body). It does not depend on the Python bootstrap's event format.
HEADECHO_SERVER = r'''
import hashlib, json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _reply(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace") if len(body) <= 1 << 20 else None,
            "bodyLength": len(body),
            "bodySha256": hashlib.sha256(body).hexdigest(),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _reply
    def log_message(self, fmt, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["APUS_PORT"])), Echo)
server.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown, daemon=True).start())
print("headecho listening", flush=True)
server.serve_forever()
'''


def write_headecho(dst: Path, name: str = "headecho") -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "server.py").write_text(HEADECHO_SERVER)
    (dst / "apus.yaml").write_text(
        f"name: {name}\nruntime: command\ncommand: [\"python3\", \"server.py\"]\nconcurrency: 4\n"
    )
    return dst


def make_self_signed_cert(dst: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (openssl); returns (cert.pem, key.pem)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cert, key = dst / "cert.pem", dst / "key.pem"
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"openssl req failed ({p.returncode}): {p.stderr}"
    return cert, key


# --------------------------------------------------------------------------------------------------------------
# Processes


@lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def apusd_has_option(option: str) -> bool:
    """Whether the apusd binary under test lists `option` (e.g. "--thrift-port") in its --help."""
    try:
        p = subprocess.run([str(APUSD), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(re.escape(option) + r"\b", p.stdout + p.stderr) is not None


def _proc_stat(pid: int):
    """(ppid, pgid, sid) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[3])


def _all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def processes_of(root_pid: int | None, marker: str) -> list[int]:
    """Processes belonging to one apusd run: in its session/process group (it is started with a new session),
    or mentioning its (unique) data dir in their command line or working dir, plus all their descendants."""
    me = os.getpid()
    stats = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None:
            stats[pid] = st
    roots = set()
    for pid, (ppid, pgid, sid) in stats.items():
        if pid == me:
            continue
        if root_pid is not None and (pgid == root_pid or sid == root_pid):
            roots.add(pid)
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            cmdline = ""
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if marker in cmdline or cwd.startswith(marker):
            roots.add(pid)
    children = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found or pid == me:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


class Apusd:
    """One apusd process over a data dir; can be stopped and started again over the same data dir."""

    def __init__(self, workdir: Path, extra_args: tuple = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "apusd.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.host = self.api_port = self.http_port = None
        self.api_host: str | None = None  # ports.json "apiHost": where the control API listens (--api-host)
        self.api_scheme = "http"  # ports.json "apiScheme": https with --api-tls-cert
        self.tls_port: int | None = None  # set when apusd was started with --tls-port
        self.thrift_port: int | None = None  # the gateway's Thrift port (ports.json "thrift"), when it has one
        self.cert_path: Path | None = None  # the TLS certificate, for clients to trust (set by whoever made it)
        self.info: dict = {}
        # Put before apusd's command line (test_unprivileged_apusd.py runs apusd as another user this way).
        self.command_prefix: list[str] = []

    # ---- lifecycle

    @property
    def api(self) -> str:
        host = self.api_host or self.host
        return f"{self.api_scheme}://{'[' + host + ']' if ':' in host else host}:{self.api_port}"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def admin_token(self) -> str:
        """The admin token apusd made on its first start (`<data-dir>/admin.token`)."""
        return self.admin_token_path.read_text().strip()

    @property
    def gateway(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def gateway_tls(self) -> str:
        assert self.tls_port is not None, "apusd was not started with --tls-port (ports.json has no \"tls\")"
        return f"https://{self.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT):
        for binary in (APUSD, APUS):
            if not os.access(binary, os.X_OK):
                raise RuntimeError(f"{binary} not found or not executable: build first (swift build), "
                                   f"or point APUS_BIN_DIR at the directory holding apusd and apus")
        assert not self.running, "apusd is already running"
        ports_file = self.data_dir / "ports.json"
        # Ports are ephemeral: never read the previous run's file.
        ports_file.unlink(missing_ok=True)
        self.runs += 1
        cmd = [str(APUSD), "--data-dir", str(self.data_dir), "--api-port", "0", "--http-port", "0",
               "--idle-timeout", IDLE_TIMEOUT, *self.extra_args]
        if "--autoscale-window" not in self.extra_args and apusd_has_option("--autoscale-window"):
            # Short autoscaler windows, so that instances of these tests still go idle within IDLE_TIMEOUT
            # after their traffic (the autoscaler's own behaviour has its own tests).
            cmd += ["--autoscale-window", "2s", "--scale-to-zero-grace", "0s"]
        if "--callback-allow" not in self.extra_args and apusd_has_option("--callback-allow"):
            # The tests' callback sinks listen on loopback, which apusd refuses by default (test_tasks.py has the
            # refusals, on a daemon of their own).
            cmd += ["--callback-allow", "127.0.0.1"]
        if "--thrift-port" not in self.extra_args and apusd_has_option("--thrift-port"):
            # Every daemon gets a Thrift port too (a free one) once apusd has the listener.
            cmd += ["--thrift-port", "0"]
        with open(self.log_path, "ab") as log:
            cmd = [*self.command_prefix, *cmd]
            log.write(f"==== run {self.runs}: {' '.join(cmd)}\n".encode())
            log.flush()
            env = {k: v for k, v in os.environ.items() if k != "APUS_API"}
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        ports = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"apusd exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                ports = json.loads(ports_file.read_text())
                if all(k in ports for k in ("host", "api", "http")) and ("thrift" in ports or "--thrift-port" not in cmd):
                    break
            except (OSError, ValueError):
                pass  # not there yet, or half written
            ports = None
            time.sleep(0.05)
        if ports is None:
            self.kill()
            raise RuntimeError(f"apusd wrote no {ports_file} within {timeout:.0f}s:\n{self.log_tail()}")
        self.host, self.api_port, self.http_port = ports["host"], int(ports["api"]), int(ports["http"])
        self.api_host = ports.get("apiHost")
        self.api_scheme = ports.get("apiScheme", "http")
        if self.admin_token_path.exists():
            API_TOKENS[self.api] = self.admin_token
        self.tls_port = int(ports["tls"]) if ports.get("tls") is not None else None
        self.thrift_port = int(ports["thrift"]) if ports.get("thrift") is not None else None
        last = None
        while time.monotonic() < deadline:
            try:
                r = http_request(self.api, "GET", "/v1/info", timeout=5)
                if r.status == 200:
                    self.info = r.json()
                    return self
                last = r
            except OSError as exc:
                last = exc
            if self.proc.poll() is not None:
                raise RuntimeError(f"apusd exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"apusd API never answered GET /v1/info (last: {last!r}):\n{self.log_tail()}")

    def signal(self, sig=signal.SIGTERM):
        assert self.running, "apusd is not running"
        self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for apusd to exit; on timeout kill it (and its leftovers) and fail."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"apusd did not exit within {timeout:.0f}s after the signal:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def restart(self, timeout: float = STARTUP_TIMEOUT) -> int:
        """Graceful stop, then start again over the same data dir (new ephemeral ports). Returns the stop's rc."""
        rc = self.stop()
        self.start(timeout)
        return rc

    def leftovers(self) -> list[int]:
        """Processes of this daemon (apusd itself, instances, sandboxes) still alive."""
        pid = self.proc.pid if self.proc is not None else None
        return processes_of(pid, str(self.data_dir))

    def kill(self):
        """SIGKILL apusd and every process of it that is still alive (by pid)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            pids = self.leftovers()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)

    def teardown(self):
        try:
            if self.running:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.kill()

    def log_tail(self, lines: int = 80) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no apusd log)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    # ---- clients

    def cli(self, *args, timeout: float = 60.0, input: str | None = None,
            api: str | None = None, token=AUTO) -> tuple[int, str, str]:
        """Run the real `apus --api <url> ARGS...` with the admin token in APUS_TOKEN (or `token`, or none with
        token=None); returns (rc, stdout, stderr)."""
        env = {k: v for k, v in os.environ.items() if k not in ("APUS_API", "APUS_TOKEN")}
        if token is AUTO:
            token = API_TOKENS.get(api or self.api)
        if token is not None:
            env["APUS_TOKEN"] = token
        p = subprocess.run([str(APUS), "--api", api or self.api, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, input=input, cwd=self.workdir, env=env)
        return p.returncode, p.stdout, p.stderr

    def cli_ok(self, *args, **kw) -> str:
        rc, out, err = self.cli(*args, **kw)
        assert rc == 0, f"apus {' '.join(map(str, args))} exited {rc}\nstdout: {out}\nstderr: {err}"
        return out

    def cli_json(self, *args, **kw):
        out = self.cli_ok(*args, "--json", **kw)
        try:
            return json.loads(out)
        except ValueError as exc:
            raise AssertionError(f"apus {' '.join(map(str, args))} --json printed no JSON: {out!r}") from exc

    def deploy(self, func_dir: Path, release: bool = True) -> str:
        args = ["deploy", str(func_dir)] + ([] if release else ["--no-release"])
        return self.cli_ok(*args)

    def api_call(self, method: str, path: str, body=None, headers: dict | None = None,
                 timeout: float = 30.0, token=AUTO) -> Response:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return http_request(self.api, method, path, body=body, headers=headers, timeout=timeout, token=token)

    def api_json(self, method: str, path: str, body=None, expect: int = 200):
        r = self.api_call(method, path, body)
        assert r.status == expect, f"{method} {path}: expected {expect}, got {r!r}"
        return r.json()

    def gw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
           timeout: float = 30.0) -> Response:
        return http_request(self.gateway, method, path, body=body, headers=headers, timeout=timeout)

    def get(self, path: str, **kw) -> Response:
        return self.gw("GET", path, **kw)


def call_together(n: int, call, timeout: float = 100.0) -> list:
    """Runs call(i) for i in 0..n-1 on n threads released at the same moment; returns each call's result, or the
    exception it raised, in order (None if it had not finished within `timeout`)."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        try:
            results[i] = call(i)
        except Exception as exc:  # handed back to the caller
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


def wait_for_log(apusd, name: str, needle: str, timeout: float = 15.0):
    """Poll `apus logs NAME` until a line containing needle shows up; returns that line parsed by LOG_LINE_RE."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = apusd.cli_ok("logs", name)
        for line in out.splitlines():
            if needle in line:
                m = LOG_LINE_RE.match(line)
                assert m, f"log line not in the `<ts> v<N> <instance> <stream>| text` format: {line!r}"
                return m
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} never showed up in `apus logs {name}` within {timeout:.0f}s:\n{out[-3000:]}")


def instance_memory_limit(apusd, function: str, instance: str):
    """The memory limit an instance runs under, read on the host: its cgroup's (v1 memory.limit_in_bytes, v2
    memory.max) when apusd gives instances cgroups, else None. Found through the instance's pid in the API."""
    listed = apusd.api_json("GET", f"/v1/functions/{function}/instances")["instances"]
    pid = next((i.get("pid") for i in listed if i["id"] == instance), None)
    assert pid, f"instance {instance} of {function} has no pid in {listed}"
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            limit = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            return int(limit.read_text())
        if number == "0" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").exists():
            text = (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").read_text().strip()
            return None if text == "max" else int(text)
    return None
