"""The HTTP/1.1 edge against real clients: curl and raw sockets for framing cases (chunked bodies, large bodies
with Expect: 100-continue, pipelining, HEAD, HTTP/1.0, malformed input, limits)."""

import hashlib
import json
import socket
import subprocess
import time

from apus_testlib import assert_error


def raw_exchange(apusd, payload: bytes, read_until_close=True, timeout=10.0) -> bytes:
    with socket.create_connection((apusd.host, apusd.http_port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
            if not read_until_close:
                break
        return b"".join(chunks)


def test_chunked_request_body_with_curl(apusd, deployed, tmp_path):
    deployed.fixture("shapes")
    body = ("line %d\n" % 1 * 1).encode() + b"x" * 100_000
    path = tmp_path / "body.txt"
    path.write_bytes(body)
    out = subprocess.run(
        ["curl", "-sS", "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/plain",
         "--data-binary", f"@{path}", f"{apusd.gateway}/shapes/echo"],
        capture_output=True, timeout=30, check=True).stdout
    doc = json.loads(out)
    assert doc["body"] == body.decode() and doc["method"] == "POST", doc["body"][:80]


def test_large_body_with_expect_continue(apusd, deployed, tmp_path):
    """curl sends Expect: 100-continue for large uploads; 8 MiB goes through intact both ways."""
    deployed.headecho()
    blob = bytes(range(256)) * (8 * 4096)  # 8 MiB
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    out = subprocess.run(
        ["curl", "-sS", "-X", "PUT", "--data-binary", f"@{path}", "-H", "Content-Type: application/octet-stream",
         f"{apusd.gateway}/headecho/upload"], capture_output=True, timeout=60, check=True).stdout
    doc = json.loads(out)
    assert doc["method"] == "PUT" and doc["path"] == "/upload", {k: doc[k] for k in ("method", "path")}
    assert doc["bodyLength"] == len(blob) and doc["bodySha256"] == hashlib.sha256(blob).hexdigest()


def test_pipelined_requests_answered_in_order(apusd, deployed):
    deployed.fixture("shapes")
    requests = b"".join(
        f"GET /shapes/echo?n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)
    ) + b"GET /shapes/str HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = raw_exchange(apusd, requests)
    assert data.count(b"HTTP/1.1 200") == 6, data[:500]
    order = [int(part.split(b'"n":"')[1].split(b'"')[0]) for part in data.split(b"HTTP/1.1 200")[1:6]]
    assert order == [0, 1, 2, 3, 4], order
    assert data.rstrip().endswith(b"plain text")


def test_head_request_has_no_body(apusd, deployed):
    deployed.fixture("shapes")
    data = raw_exchange(apusd, b"HEAD /shapes/dict HTTP/1.1\r\nHost: x\r\n\r\nGET /shapes/str HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"Content-Length" in first, first
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]  # the next response follows the HEAD head directly


def test_http10_client_gets_a_closed_connection(apusd, deployed):
    deployed.fixture("shapes")
    data = raw_exchange(apusd, b"GET /shapes/str HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"plain text"), data
    assert b"Connection: close" in data


def test_malformed_request_gets_400_and_gateway_stays_up(apusd, deployed):
    deployed.fixture("shapes")
    data = raw_exchange(apusd, b"THIS IS NOT HTTP\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data
    data = raw_exchange(apusd, b"GET /shapes/str HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data
    data = raw_exchange(apusd, b"GET /shapes/str HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data
    data = raw_exchange(apusd, b"GET /shapes/str HTTP/2.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 505"), data
    assert apusd.get("/shapes/str").status == 200


def test_oversized_body_is_refused_with_413(apusd, deployed):
    deployed.fixture("shapes")
    data = raw_exchange(apusd, b"POST /shapes/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 413"), data
    assert b'"code":"payload_too_large"' in data


def test_error_before_body_closes_cleanly(apusd):
    data = raw_exchange(apusd, b"POST /no-such-function/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert data.startswith(b"HTTP/1.1 404") and b"Connection: close" in data, data


def test_client_leaving_mid_request_frees_the_slot(apusd, deployed, tmp_path):
    """A client that hangs up while its request runs must not leak the instance slot."""
    from apus_testlib import FUNCTIONS_DIR, copy_function
    name = deployed(copy_function(FUNCTIONS_DIR / "counter", tmp_path / "solo", name="solo",
                                  subs=[(r"^concurrency:.*$", "concurrency: 1"), (r"^  max: 3$", "  max: 1")]))
    assert apusd.get(f"/{name}/?sleep=0").status == 200
    for _ in range(3):
        with socket.create_connection((apusd.host, apusd.http_port), timeout=5) as s:
            s.sendall(f"GET /{name}/?sleep=0.5 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.1)
    time.sleep(0.8)
    r = apusd.get(f"/{name}/?sleep=0", timeout=10)
    assert r.status == 200, r
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    assert all(i["inFlight"] == 0 for i in doc["instances"]), doc
    assert doc["queueDepth"] == 0, doc


def test_large_responses_leave_pooled_connections_usable(apusd, deployed):
    """Relaying a large response pauses reading from the instance while the client catches up; the pooled
    connection must come back fully working for the next requests."""
    deployed.fixture("shapes")
    big = b"y" * (1 << 20)
    for _ in range(3):
        r = apusd.gw("POST", "/shapes/echo", body=big, headers={"Content-Type": "text/plain"}, timeout=20)
        assert r.status == 200 and len(r.json()["body"]) == len(big)
        for _ in range(4):
            assert apusd.get("/shapes/str", timeout=10).status == 200


def test_pipelined_request_behind_a_timed_out_one_is_served(apusd, deployed):
    deployed.fixture("sleeper")
    assert apusd.get("/sleeper/?sleep=0").status == 200
    data = raw_exchange(apusd, b"GET /sleeper/?sleep=3 HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /sleeper/?sleep=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=15)
    assert data.startswith(b"HTTP/1.1 504"), data[:300]
    assert b"HTTP/1.1 200" in data and data.rstrip().endswith(b"done"), data[-300:]


GARBAGE_SERVER = r'''
import os, socket, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["APUS_PORT"]))); srv.listen(64)
def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return conn.close()
        data += chunk
    if data.startswith(b"GET /healthz"):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    elif b" /garbage" in data:
        conn.sendall(b"THIS IS NOT HTTP AT ALL\r\n\r\n")
    elif b" /hang-up" in data:
        pass
    elif b" /short" in data:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this")
    conn.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def test_misbehaving_instance_gives_502_and_gateway_stays_up(apusd, deployed, tmp_path):
    fn = tmp_path / "rude"
    fn.mkdir()
    (fn / "server.py").write_text(GARBAGE_SERVER)
    (fn / "apus.yaml").write_text('name: rude\nruntime: command\ncommand: ["python3", "server.py"]\nconcurrency: 4\n')
    deployed(fn)
    for path in ("/rude/garbage", "/rude/hang-up"):
        r = apusd.get(path, timeout=15)
        assert_error(r, 502, "instance_error")
    # A response cut short after its head cannot become an error any more: the client sees the connection end.
    data = raw_exchange(apusd, b"GET /rude/short HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"only-this"), data
    deployed.fixture("shapes")
    assert apusd.get("/shapes/str").status == 200  # other functions are unaffected
