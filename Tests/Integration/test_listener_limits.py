"""The gateway's listeners under a connection flood and slow clients, each on a daemon of its own: past
--max-connections new connections are closed at accept while the ones held keep being served (HTTP port, Thrift
port, connections the reactor handed to SwiftNIO alike), and apusd stays up through thousands of attempts; an idle
keep-alive connection is closed after --connection-idle-timeout; a request head trickled in (slowloris) gets 408
after --request-head-timeout.
"""

from __future__ import annotations

import socket
import time

import pytest

from apus_testlib import EXAMPLES_DIR, Apusd, apusd_has_option

pytestmark = pytest.mark.skipif(not apusd_has_option("--max-connections"), reason="apusd has no --max-connections")

LIMIT = 40


def closed_at_once(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server closes the connection without a byte (it was refused at accept)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def get_on(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    sock.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    d = Apusd(tmp_path_factory.mktemp("apusd-limits"),
              extra_args=("--max-connections", str(LIMIT), "--connection-idle-timeout", "2s",
                          "--request-head-timeout", "2s"))
    try:
        d.start()
        d.deploy(EXAMPLES_DIR / "hello-python")
        assert d.get("/hello-python/").status == 200
        yield d
    finally:
        d.teardown()


@pytest.mark.timeout(120)
def test_connections_past_the_limit_are_refused_and_held_ones_served(limited):
    d = limited
    held = []
    try:
        for _ in range(LIMIT):
            s = socket.create_connection((d.host, d.http_port), timeout=10)
            held.append(s)
        time.sleep(0.3)
        # Every place is taken: the next connections are closed at once, on the HTTP and the Thrift port.
        for port in (d.http_port, d.thrift_port):
            extra = socket.create_connection((d.host, port), timeout=10)
            assert closed_at_once(extra), f"a connection past --max-connections {LIMIT} on port {port} was kept"
            extra.close()
        # The held ones are served (within their idle timeout).
        for s in held[:5]:
            assert b" 200 " in get_on(s, "/hello-python/").split(b"\r\n")[0] + b" "
        # Thousands of attempts at the limit: refused one by one, apusd stays up and serves.
        refused = 0
        for _ in range(2000):
            try:
                s = socket.create_connection((d.host, d.http_port), timeout=5)
                refused += closed_at_once(s, timeout=2)
                s.close()
            except OSError:
                refused += 1
        assert refused >= 1900, refused
        assert d.running, "apusd died under the connection flood"
    finally:
        for s in held:
            s.close()
    # Places come back when connections close.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if d.get("/hello-python/").status == 200:
            break
        time.sleep(0.2)
    assert d.get("/hello-python/").status == 200
    assert "connection limit reached" in d.log_tail(400)


@pytest.mark.timeout(60)
def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(limited):
    d = limited
    with socket.create_connection((d.host, d.http_port), timeout=10) as s:
        assert b" 200 " in get_on(s, "/hello-python/")
        started = time.monotonic()
        assert closed_at_once(s, timeout=10), "the idle connection was never closed"
        waited = time.monotonic() - started
        assert 1.5 <= waited <= 8, f"closed after {waited:.1f}s with --connection-idle-timeout 2s"


@pytest.mark.timeout(60)
def test_slowloris_head_gets_408_and_the_connection_closes(limited):
    d = limited
    with socket.create_connection((d.host, d.http_port), timeout=10) as s:
        s.sendall(b"GET /hello-python/ HTTP/1.1\r\n")
        data, started = b"", time.monotonic()
        s.settimeout(1)
        while time.monotonic() - started < 10:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # a header line every 0.5 s, never the end of the head
            except OSError:
                break
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            except socket.timeout:
                pass
            time.sleep(0.5)
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert b"did not arrive whole within 2s" in data, data
    assert d.get("/hello-python/").status == 200
