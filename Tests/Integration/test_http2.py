"""HTTP/2 at the edge for HTTP functions: h2c with prior knowledge, h2c upgrade from HTTP/1.1, TLS with ALPN, real
clients (curl, nghttp) and a raw socket that misbehaves after the connection preface."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from apus_testlib import EXAMPLES_DIR

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_DATA, FRAME_HEADERS, FRAME_SETTINGS, FRAME_PING, FRAME_GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
PROTOCOL_ERROR, FRAME_SIZE_ERROR = 0x1, 0x6


class CurlResult:
    def __init__(self, rc: int, status: int, http_version: str, body: bytes, headers: str, stderr: str):
        self.rc, self.status, self.http_version = rc, status, http_version
        self.body, self.headers, self.stderr = body, headers, stderr

    def header(self, name: str):
        m = re.search(rf"^{re.escape(name)}:\s*(.*?)\s*$", self.headers, re.IGNORECASE | re.MULTILINE)
        return m.group(1) if m else None

    def __repr__(self):
        return (f"<curl rc={self.rc} status={self.status} http_version={self.http_version!r} "
                f"body={self.body[:300]!r} stderr={self.stderr[-500:]!r}>")


def curl(tmp_path: Path, url: str, *args: str) -> CurlResult:
    """Run curl; returns status, negotiated HTTP version (%{http_version}: "1.1", "2"), body and headers."""
    body_file, head_file = tmp_path / "curl-body", tmp_path / "curl-headers"
    for f in (body_file, head_file):
        f.unlink(missing_ok=True)
    p = subprocess.run(["curl", "-sS", "--max-time", "30", "-o", str(body_file), "-D", str(head_file),
                        "-w", "%{http_code} %{http_version}", *args, url],
                       capture_output=True, text=True, timeout=60)
    status, _, version = p.stdout.strip().partition(" ")
    return CurlResult(p.returncode, int(status or 0), version,
                      body_file.read_bytes() if body_file.exists() else b"",
                      head_file.read_text("latin-1") if head_file.exists() else "", p.stderr)


def json_body(r: CurlResult):
    try:
        return json.loads(r.body)
    except ValueError as exc:
        raise AssertionError(f"body is not JSON: {r!r}") from exc


@pytest.fixture(scope="module")
def hello(deployed):
    return deployed.example("hello-python")


# ---- h2c -----------------------------------------------------------------------------------------------------


def test_h2_prior_knowledge_get(apusd, hello, tmp_path):
    r = curl(tmp_path, f"{apusd.gateway}/hello-python/hi?name=Ada", "--http2-prior-knowledge")
    assert r.rc == 0 and r.status == 200 and r.http_version == "2", r
    doc = json_body(r)
    assert doc["message"] == "Hello, Ada!" and doc["path"] == "/hi" and doc["method"] == "GET", doc
    assert r.header("x-apus-request-id") and r.header("x-apus-version") == "1", r.headers

    # Host routing: :authority names the function, the path reaches it unchanged.
    r = curl(tmp_path, f"{apusd.gateway}/any/path?name=Bo", "--http2-prior-knowledge",
             "-H", "Host: hello-python.apus.localhost")
    assert r.rc == 0 and r.status == 200 and r.http_version == "2", r
    assert json_body(r)["path"] == "/any/path" and json_body(r)["message"] == "Hello, Bo!"


def test_h2_prior_knowledge_unknown_function_is_404(apusd, tmp_path):
    r = curl(tmp_path, f"{apusd.gateway}/no-such-function/", "--http2-prior-knowledge")
    assert r.rc == 0 and r.status == 404 and r.http_version == "2", r
    assert json_body(r)["error"]["code"], r


def test_h2_request_past_the_function_timeout_is_504_and_the_next_one_is_served(apusd, deployed, tmp_path):
    """The HTTP/2 relay's deadline (the loop's one deadline timer): `sleeper` has `timeout: 1s`."""
    deployed.fixture("sleeper")
    assert curl(tmp_path, f"{apusd.gateway}/sleeper/?sleep=0", "--http2-prior-knowledge").status == 200
    r = curl(tmp_path, f"{apusd.gateway}/sleeper/?sleep=3", "--http2-prior-knowledge")
    # Without the deadline the function's answer (200) would come after 3 s.
    assert r.rc == 0 and r.status == 504 and r.http_version == "2", r
    assert json_body(r)["error"]["code"] == "deadline_exceeded", r
    assert "within its timeout of 1s" in json_body(r)["error"]["message"], r
    r = curl(tmp_path, f"{apusd.gateway}/sleeper/?sleep=0", "--http2-prior-knowledge")
    assert r.status == 200, r


def test_h2c_upgrade_from_http11(apusd, hello, tmp_path):
    r = curl(tmp_path, f"{apusd.gateway}/hello-python/up?name=Cy", "--http2")
    assert r.rc == 0 and r.status == 200, r
    assert r.http_version == "2", f"the h2c upgrade was not accepted: {r!r}"
    assert json_body(r)["message"] == "Hello, Cy!"


def test_nghttp_client(apusd, hello):
    p = subprocess.run(["nghttp", "-v", f"{apusd.gateway}/hello-python/?name=Nghttp"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"nghttp exited {p.returncode}\nstdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-2000:]}"
    assert re.search(r":status: 200\b", p.stdout), p.stdout[-3000:]
    assert "Hello, Nghttp!" in p.stdout, p.stdout[-3000:]


@pytest.mark.parametrize("size", [13, 3 * 1024 * 1024])
def test_h2_post_body_reaches_the_function(apusd, deployed, tmp_path, size):
    """A request body sent over HTTP/2 (DATA frames, flow controlled) arrives intact at an HTTP/1.1 instance."""
    deployed.fixture("shapes")
    body = b"hello over h2" if size == 13 else os.urandom(size)
    body_file = tmp_path / "request-body"
    body_file.write_bytes(body)
    r = curl(tmp_path, f"{apusd.gateway}/shapes/echo?x=1", "--http2-prior-knowledge",
             "-X", "POST", "--data-binary", f"@{body_file}", "-H", "Content-Type: application/x-test")
    assert r.rc == 0 and r.status == 200 and r.http_version == "2", r
    doc = json_body(r)
    assert doc["method"] == "POST" and doc["path"] == "/echo" and doc["query"] == {"x": "1"}, doc
    assert doc["contentType"] == "application/x-test", doc
    got = base64.b64decode(doc["body"]) if doc["isBase64Encoded"] else doc["body"].encode("utf-8")
    assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(body).digest(), \
        f"body of {size} bytes arrived as {len(got)} bytes"


# ---- a misbehaving peer --------------------------------------------------------------------------------------


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def read_frames_until_close(sock: socket.socket, timeout: float = 10.0):
    """Read what the server sends until it closes the connection; returns ([(type, flags, stream, payload)], closed)."""
    sock.settimeout(timeout)
    data, closed = b"", False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    frames, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        frames.append((ftype, flags, stream, data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return frames, closed


GARBAGE = {
    # The first 3 bytes read as a frame length of ~7.6 MB, far above SETTINGS_MAX_FRAME_SIZE (16384).
    "text": b"this is not an http/2 frame, just text\r\n" * 8,
    # A frame header announcing 16 MiB - 1 of DATA.
    "oversized-frame": b"\xff\xff\xff" + bytes([FRAME_DATA, 0]) + struct.pack(">I", 1) + b"\x00" * 64,
    # DATA on stream 0 is a connection error of type PROTOCOL_ERROR.
    "data-on-stream-0": frame(FRAME_DATA, 0, 0, b"nope"),
    # HEADERS (a valid HPACK block: GET http /) on an even stream id, which only a server may open.
    "headers-even-stream": frame(FRAME_HEADERS, 0x4 | 0x1, 2, b"\x82\x86\x84"),
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_garbage_after_preface_gets_goaway_and_the_gateway_keeps_serving(apusd, hello, tmp_path, garbage):
    with socket.create_connection((apusd.host, apusd.http_port), timeout=10) as sock:
        sock.sendall(H2_PREFACE + frame(FRAME_SETTINGS, 0, 0) + GARBAGE[garbage])
        frames, closed = read_frames_until_close(sock)
    goaways = [f for f in frames if f[0] == FRAME_GOAWAY]
    assert goaways, f"no GOAWAY frame received (frames: {[(f[0], f[2], len(f[3])) for f in frames]})"
    payload = goaways[-1][3]
    assert len(payload) >= 8, f"GOAWAY payload too short: {payload!r}"
    error_code = int.from_bytes(payload[4:8], "big")
    assert error_code in (PROTOCOL_ERROR, FRAME_SIZE_ERROR), f"GOAWAY error code {error_code} (debug {payload[8:]!r})"
    assert closed, "the server did not close the connection after its GOAWAY"

    # Others are still served, over HTTP/2 and HTTP/1.1.
    r = curl(tmp_path, f"{apusd.gateway}/hello-python/?name=After", "--http2-prior-knowledge")
    assert r.rc == 0 and r.status == 200 and r.http_version == "2", r
    assert apusd.get("/hello-python/?name=After").status == 200


INVALID_PREFACES = {
    # h2spec 3.5/2's shape: the preface with its last octet wrong.
    "last-octet": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\rQ",
    # Right request line, wrong rest (an HTTP/1.1 parser would have answered 505).
    "headers-after-request-line": b"PRI * HTTP/2.0\r\nHost: x\r\n\r\n",
    "wrong-version": b"PRI * HTTP/2.1\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("preface", sorted(INVALID_PREFACES))
def test_invalid_preface_gets_goaway_protocol_error(apusd, hello, preface, split):
    """RFC 9113 §3.4: an invalid connection preface is a connection error of type PROTOCOL_ERROR: the gateway
    answers with its SETTINGS and GOAWAY(PROTOCOL_ERROR), then closes; whole or trickled, on the reactor's and on
    NIO's side alike."""
    data = INVALID_PREFACES[preface]
    with socket.create_connection((apusd.host, apusd.http_port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split:
            try:
                for i in range(len(data)):
                    sock.sendall(data[i:i + 1])
                    time.sleep(0.002)
            except OSError:
                pass  # the server answered and shut its side as soon as the bytes diverged from the preface
        else:
            sock.sendall(data)
        frames, closed = read_frames_until_close(sock)
    assert frames and frames[0][0] == FRAME_SETTINGS, f"expected the server's SETTINGS first, got {frames}"
    goaways = [f for f in frames if f[0] == FRAME_GOAWAY]
    assert len(goaways) == 1, f"expected one GOAWAY, got frames {[(f[0], f[3]) for f in frames]}"
    payload = goaways[0][3]
    last_stream, error_code = int.from_bytes(payload[0:4], "big"), int.from_bytes(payload[4:8], "big")
    assert (last_stream, error_code) == (0, PROTOCOL_ERROR), payload
    assert b"preface" in payload[8:], payload
    assert closed, "the server did not close the connection after its GOAWAY"
    assert apusd.get("/hello-python/").status == 200


def test_plain_http11_that_is_no_preface_is_still_http11(apusd, hello):
    """Only an unmistakable attempt at the preface gets GOAWAY: other bytes stay HTTP/1.1 (and get its answers)."""
    for request, status in [(b"GET /hello-python/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b" 200 "),
                            (b"INVALID CONNECTION PREFACE\r\n\r\n", b" 400 "),
                            (b"PRI * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"HTTP/1.1 ")]:
        with socket.create_connection((apusd.host, apusd.http_port), timeout=10) as sock:
            sock.sendall(request)
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 ") and status in head.split(b"\r\n")[0] + b" ", (request, head)


def test_settings_must_come_first(apusd, hello):
    """A PING instead of the SETTINGS frame that must follow the preface: PROTOCOL_ERROR."""
    with socket.create_connection((apusd.host, apusd.http_port), timeout=10) as sock:
        sock.sendall(H2_PREFACE + frame(FRAME_PING, 0, 0, b"\x00" * 8))
        frames, closed = read_frames_until_close(sock)
    goaways = [f for f in frames if f[0] == FRAME_GOAWAY]
    assert goaways and int.from_bytes(goaways[-1][3][4:8], "big") == PROTOCOL_ERROR, frames
    assert apusd.get("/hello-python/").status == 200


# ---- TLS with ALPN -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_hello(tls_apusd):
    tls_apusd.deploy(EXAMPLES_DIR / "hello-python")
    return tls_apusd


def test_tls_alpn_negotiates_h2(tls_hello, tmp_path):
    d = tls_hello
    r = curl(tmp_path, f"{d.gateway_tls}/hello-python/?name=Tls", "--cacert", str(d.cert_path),
             "--http2")
    assert r.rc == 0 and r.status == 200, r
    assert r.http_version == "2", f"ALPN did not select h2: {r!r}"
    assert json_body(r)["message"] == "Hello, Tls!"


def test_tls_alpn_http11(tls_hello, tmp_path):
    d = tls_hello
    r = curl(tmp_path, f"{d.gateway_tls}/hello-python/?name=Old", "--cacert", str(d.cert_path),
             "--http1.1")
    assert r.rc == 0 and r.status == 200 and r.http_version == "1.1", r
    assert json_body(r)["message"] == "Hello, Old!"
    # The plain port of the same daemon still serves.
    assert d.get("/hello-python/").status == 200
