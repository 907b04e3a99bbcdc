"""The HTTP/1.1 reactor (the gateway's own epoll threads on the HTTP port) and its hand-over to SwiftNIO.

A `runtime: command` backend written here answers with every response framing (Content-Length, chunked,
close-delimited, interim 1xx, HEAD, 204), large and slow bodies; the tests drive it through the gateway with raw
sockets so that keep-alive, pipelining and hand-over order are visible byte for byte.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from apus_testlib import APUSD, Apusd, http_request

RAW_BACKEND = r'''
import hashlib, os, socket, threading, time
from urllib.parse import urlsplit, parse_qs

def read_head(conn, buf):
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), rest

def serve(conn):
    buf = b""
    try:
        while True:
            head, buf = read_head(conn, buf)
            if head is None:
                return
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while True:
                    while b"\r\n" not in buf:
                        buf += conn.recv(65536)
                    size_line, buf = buf.split(b"\r\n", 1)
                    size = int(size_line.split(b";")[0], 16)
                    while len(buf) < size + 2:
                        buf += conn.recv(65536)
                    body, buf = body + buf[:size], buf[size + 2:]
                    if size == 0:
                        break
            else:
                n = int(headers.get("content-length", "0"))
                while len(buf) < n:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:n], buf[n:]
            url = urlsplit(target)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path
            if path == "/chunked":
                parts = int(q.get("n", "3"))
                out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
                for i in range(parts):
                    piece = ("part%d;" % i).encode()
                    out += b"%x\r\n%s\r\n" % (len(piece), piece)
                conn.sendall(out + b"0\r\n\r\n")
            elif path == "/close":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil-close-body")
                conn.shutdown(socket.SHUT_WR)
                return
            elif path == "/early":
                conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
                time.sleep(0.05)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
            elif path == "/nocontent":
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif path == "/big":
                size = int(q.get("mb", "1")) << 20
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                block = b"z" * (1 << 20)
                for _ in range(size >> 20):
                    conn.sendall(block)
            elif path == "/slow":
                time.sleep(float(q.get("s", "1")))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            else:
                digest = hashlib.sha256(body).hexdigest().encode()
                payload = b"%s %s %d %s" % (method.encode(), target.encode(), len(body), digest)
                if method == "HEAD":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    except OSError:
        pass
    finally:
        conn.close()

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["APUS_PORT"])))
srv.listen(128)
print("raw backend listening", flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


@pytest.fixture(scope="module")
def rawfn(apusd, deployed, tmp_path_factory):
    d = tmp_path_factory.mktemp("rawbackend")
    (d / "server.py").write_text(RAW_BACKEND)
    (d / "apus.yaml").write_text(
        "name: rawbackend\nruntime: command\ncommand: [\"python3\", \"server.py\"]\nconcurrency: 8\n"
        "scale: {min: 1, max: 1}\ntimeout: 5s\nmemory: 512Mi\n")
    name = deployed(d)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if apusd.get(f"/{name}/warm").status == 200:
            return name
        time.sleep(0.2)
    raise AssertionError("rawbackend never answered")


def connect(apusd) -> socket.socket:
    s = socket.create_connection((apusd.host, apusd.http_port), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    """Reads HTTP/1.1 responses off a socket one by one (Content-Length, chunked or until close)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.buf += data
        return True

    def response(self, head_request: bool = False) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response head (have {self.buf[:200]!r})"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if head_request or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                assert self._fill(), "connection closed inside a body"
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    assert self._fill()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return status, headers, body
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body


def test_every_response_framing_is_relayed_on_one_kept_alive_connection(apusd, rawfn):
    with connect(apusd) as s:
        r = Reader(s)
        s.sendall(f"GET /{rawfn}/chunked?n=4 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = r.response()
        assert status == 200 and body == b"part0;part1;part2;part3;", (status, headers, body)
        assert headers["x-apus-version"] == "1" and headers["x-apus-request-id"]

        s.sendall(f"GET /{rawfn}/early HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = r.response()
        assert status == 103 and "style.css" in headers.get("link", ""), (status, headers)
        status, headers, body = r.response()
        assert status == 200 and body == b"final"

        s.sendall(f"GET /{rawfn}/nocontent HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = r.response()
        assert status == 204 and body == b""

        s.sendall(f"HEAD /{rawfn}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = r.response(head_request=True)
        assert status == 200 and int(headers["content-length"]) > 0 and body == b""

        s.sendall(f"POST /{rawfn}/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
        status, headers, body = r.response()
        assert status == 200 and body.startswith(b"POST /echo 5 " + hashlib.sha256(b"hello").hexdigest().encode())

        # A close-delimited response ends the client connection too, after the whole body.
        s.sendall(f"GET /{rawfn}/close HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = r.response()
        assert status == 200 and headers.get("connection") == "close" and body == b"until-close-body"


def test_pipelined_requests_are_answered_in_order(apusd, rawfn):
    n = 40
    payload = b"".join(f"GET /{rawfn}/p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(n))
    with connect(apusd) as s:
        s.sendall(payload)
        r = Reader(s)
        for i in range(n):
            status, _, body = r.response()
            assert status == 200 and body.startswith(f"GET /p{i} 0 ".encode()), (i, body)


def test_requests_the_reactor_does_not_serve_move_to_nio_in_order(apusd, rawfn):
    """One connection, pipelined: a plain GET (reactor), `Expect: 100-continue` and a chunked body (both handed
    over to SwiftNIO with everything after them), then plain requests again — every answer in order."""
    payload = (
        f"GET /{rawfn}/first HTTP/1.1\r\nHost: x\r\n\r\n"
        f"POST /{rawfn}/expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
        f"POST /{rawfn}/chunked-in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n"
        f"GET /{rawfn}/last HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    with connect(apusd) as s:
        s.sendall(payload)
        r = Reader(s)
        status, _, body = r.response()
        assert status == 200 and body.startswith(b"GET /first 0 "), body
        status, _, _ = r.response()
        assert status == 100
        status, _, body = r.response()
        assert status == 200 and body.startswith(b"POST /expect 3 " + hashlib.sha256(b"abc").hexdigest().encode()), body
        status, _, body = r.response()
        assert status == 200 and body.startswith(b"POST /chunked-in 4 " + hashlib.sha256(b"wxyz").hexdigest().encode()), body
        status, _, body = r.response()
        assert status == 200 and body.startswith(b"GET /last 0 "), body


def test_errors_before_a_request_starts_come_from_the_full_handler(apusd, rawfn):
    with connect(apusd) as s:
        r = Reader(s)
        s.sendall(f"GET /{rawfn}/ok HTTP/1.1\r\nHost: x\r\n\r\nGET /no-such-function-here/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert r.response()[0] == 200
        status, headers, body = r.response()
        assert status == 404 and b"not_found" in body, body
    with connect(apusd) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        status, _, body = Reader(s).response()
        assert status == 400 and b"Content-Length" in body, body
    # A head over 64 KiB is refused even when all of it arrives before the gateway looks (it reached the
    # instance before).
    with connect(apusd) as s:
        s.sendall(f"GET /{rawfn}/big-head HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 70000}\r\n\r\n".encode())
        status, headers, body = Reader(s).response()
        assert status == 431 and b"64 KiB" in body and "x-apus-version" not in headers, (status, body[:200])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.timeout(120)
def test_large_bodies_both_ways_and_a_slow_client_keep_memory_bounded(apusd, rawfn):
    body = bytes(range(256)) * (8 << 12)  # 8 MiB
    r = http_request(apusd.gateway, "POST", f"/{rawfn}/upload", body=body, timeout=60)
    assert r.status == 200 and r.body.decode().split(" ")[2:4] == [str(len(body)), hashlib.sha256(body).hexdigest()]

    pid = apusd.proc.pid
    before = rss_kib(pid)
    with connect(apusd) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(f"GET /{rawfn}/big?mb=48 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(2)  # the client reads nothing: the gateway must stop reading the instance
        during = rss_kib(pid)
        got = 0
        while got < (48 << 20):
            data = s.recv(1 << 20)
            assert data, "connection closed early"
            got += len(data)
    assert got >= 48 << 20
    assert during - before < 24 << 10, f"apusd grew by {(during - before) >> 10} MiB while the client was not reading"


def test_a_client_that_leaves_mid_request_gives_its_slot_back(apusd, rawfn):
    s = connect(apusd)
    s.sendall(f"GET /{rawfn}/slow?s=1.5 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 10
    metrics = ""
    while time.monotonic() < deadline:
        metrics = http_request(apusd.api, "GET", "/metrics").body.decode()
        if re.search(r'apus_requests_total\{[^}]*code="499"[^}]*function="rawbackend"', metrics) or \
                re.search(r'apus_requests_total\{[^}]*function="rawbackend"[^}]*code="499"', metrics):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no 499 recorded for rawbackend:\n" + "\n".join(
            line for line in metrics.splitlines() if "rawbackend" in line))
    in_flight = [line for line in metrics.splitlines()
                 if line.startswith("apus_requests_in_flight") and 'function="rawbackend"' in line]
    assert in_flight and all(line.rstrip().endswith(" 0") or line.rstrip().endswith(" 0.0") for line in in_flight), in_flight


def test_deadline_gives_504_on_the_reactor_and_the_connection_stays_usable(apusd, rawfn):
    with connect(apusd) as s:
        r = Reader(s)
        started = time.monotonic()
        s.sendall(f"GET /{rawfn}/slow?s=8 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = r.response()
        assert status == 504 and b"deadline_exceeded" in body, body
        assert 4.5 < time.monotonic() - started < 7.5
        s.sendall(f"GET /{rawfn}/after HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert r.response()[0] == 200


def test_nio_engine_serves_the_same_requests(tmp_path, rawfn):
    d = Apusd(tmp_path / "nio", extra_args=("--http1-engine", "nio"))
    try:
        d.start()
        assert "http1=nio" in d.log_tail(200)
        fn = Path(tmp_path / "fn")
        fn.mkdir()
        (fn / "server.py").write_text(RAW_BACKEND)
        (fn / "apus.yaml").write_text("name: rawbackend\nruntime: command\ncommand: [\"python3\", \"server.py\"]\ntimeout: 1s\n")
        d.deploy(fn)
        with connect(d) as s:
            s.sendall(b"GET /rawbackend/chunked?n=2 HTTP/1.1\r\nHost: x\r\n\r\nGET /rawbackend/y HTTP/1.1\r\nHost: x\r\n\r\n")
            r = Reader(s)
            assert r.response()[2] == b"part0;part1;"
            assert r.response()[2].startswith(b"GET /y 0 ")
            # The handler's deadline (its loop's deadline list): 504 at the 1 s timeout (the instance would answer
            # 200 after 4 s), and the connection serves the next request.
            s.sendall(b"GET /rawbackend/slow?s=4 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = r.response()
            assert status == 504 and b"within its timeout of 1s" in body, body
            s.sendall(b"GET /rawbackend/after HTTP/1.1\r\nHost: x\r\n\r\n")
            assert r.response()[0] == 200
    finally:
        d.teardown()


def test_bad_engine_name_is_refused(tmp_path):
    d = Apusd(tmp_path / "bad", extra_args=("--http1-engine", "epoll"))
    with pytest.raises(Exception):
        d.start(timeout=15)
    assert "--http1-engine: must be reactor or nio (got epoll)" in d.log_tail(50)
    d.teardown()


@pytest.mark.parametrize("args, message", [
    (["--api-port", "70000"], "--api-port: must be 0...65535 (got 70000)"),  # was taken modulo 65536
    (["--http-port", "-1"], "--http-port: must be 0...65535 (got -1)"),
    (["--thrift-port", "65536"], "--thrift-port: must be 0...65535 (got 65536)"),
    (["--queue-length", "-3"], "--queue-length: must be 0...1000000 (got -3)"),
    (["--gateway-threads", "0"], "--gateway-threads: must be 1...1024 (got 0)"),
    (["--gateway-threads", "-2"], "--gateway-threads: must be 1...1024 (got -2)"),
    (["--h2-max-streams", "-5"], "--h2-max-streams: must be 1...100000 (got -5)"),
])
def test_numbers_out_of_range_are_refused_at_startup(tmp_path, args, message):
    """Every numeric flag is range-checked, negative values included (they are read as values, not as flags)."""
    base = ["--data-dir", str(tmp_path / "data"), "--api-port", "0", "--http-port", "0"]
    p = subprocess.run([str(APUSD), *base, *args], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, f"apusd {' '.join(args)} started:\n{p.stdout}\n{p.stderr}"
    assert message in p.stderr, p.stderr
    assert not (tmp_path / "data" / "ports.json").exists()


def test_http_port_in_use_is_a_clear_error_and_apusd_exits(tmp_path):
    """The reactor binds the HTTP port itself: a taken port ends apusd with the address and the reason (it used
    to hang, with the task manager's loop spinning after the group was cancelled)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        p = subprocess.run([str(APUSD), "--data-dir", str(tmp_path / "taken" / "data"), "--api-port", "0",
                            "--http-port", str(port)], capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
        assert p.returncode != 0, out[-2000:]
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out, out[-2000:]
    finally:
        taken.close()



def test_h2c_clients_whose_first_packet_carries_requests_are_handed_over_whole(apusd, deployed, rawfn, tmp_path):
    """h2load writes the connection preface, SETTINGS and its first HEADERS at once: the reactor reads them, hands
    them to SwiftNIO in one go, and every call is answered — HTTP functions and gRPC ones alike (a hand-over that
    replayed the bytes without ending the read burst left the gRPC relay's coalesced flushes waiting for a read
    that never came, and h2load's calls hung)."""
    from grpc_support import ECHO_FUNCTION
    deployed.example(ECHO_FUNCTION)
    request = tmp_path / "echo-request.bin"
    request.write_bytes(bytes([0, 0, 0, 0, 4, 0x0A, 2]) + b"hi")  # one gRPC message: EchoRequest{text: "hi"}
    runs = [
        ["h2load", "-n", "64", "-c", "2", "-m", "8", "-N", "10s", f"{apusd.gateway}/{rawfn}/h2"],
        ["h2load", "-n", "256", "-c", "8", "-m", "16", "-N", "10s", "-d", str(request),
         "-H", "content-type: application/grpc", "-H", "te: trailers", f"{apusd.gateway}/echo.Echo/Get"],
    ]
    for cmd in runs:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", p.stdout)
        assert p.returncode == 0 and m and m.group(3) == m.group(1), " ".join(cmd) + "\n" + p.stdout + p.stderr
