"""The gateway's listeners under a connection flood and slow clients, each on a daemon of its own: past
--max-connections new connections are closed at accept while the ones held keep being served (HTTP port, Thrift
port, connections the reactor handed to SwiftNIO alike), and apusd stays up through thousands of attempts; an idle
keep-alive connection is closed after --connection-idle-timeout; a request head trickled in (slowloris) gets 408
after --request-head-timeout.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from apus_testlib import EXAMPLES_DIR, FUNCTIONS_DIR, Apusd, apusd_has_option

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
                          "--request-head-timeout", "2s", "--api-idle-timeout", "2s"))
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
        # The control API has listeners, limits and an event loop of its own: it answers while the gateway is full.
        assert d.api_call("GET", "/v1/info").status == 200
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
    # Places come back when connections close (once the gateway has seen the closes: until then a new connection
    # may still be closed at accept).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if d.get("/hello-python/").status == 200:
                break
        except OSError:
            pass
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


@pytest.mark.timeout(60)
def test_idle_api_connection_is_closed_after_its_idle_timeout(limited):
    d = limited
    port = int(d.api.rsplit(":", 1)[1])
    with socket.create_connection((d.host, port), timeout=10) as s:
        assert b" 200 " in get_on(s, "/healthz")  # open: needs no token
        started = time.monotonic()
        s.settimeout(10)
        data = b""
        try:
            while True:  # the rest of the /healthz body, then the close
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        waited = time.monotonic() - started
        assert 1.5 <= waited <= 8, f"the idle API connection closed after {waited:.1f}s with --api-idle-timeout 2s"


@pytest.mark.timeout(60)
def test_thrift_partial_frame_held_open_is_closed_after_the_head_timeout(limited):
    """A framed Thrift message announced and never completed (a byte every half second): closed after the head
    timeout, as a slowloris HTTP head is; an idle Thrift connection after the idle timeout."""
    d = limited
    with socket.create_connection((d.host, d.thrift_port), timeout=10) as s:
        s.sendall((1 << 20).to_bytes(4, "big"))  # a 1 MiB frame is coming
        started, closed = time.monotonic(), False
        while time.monotonic() - started < 15:
            try:
                s.sendall(b"\x80")
                s.settimeout(0.5)
                if s.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed, "a partial Thrift frame kept its connection open past --request-head-timeout"
        assert time.monotonic() - started <= 8
    with socket.create_connection((d.host, d.thrift_port), timeout=10) as s:
        started = time.monotonic()
        assert closed_at_once(s, timeout=10), "an idle Thrift connection was never closed"
        assert 1.5 <= time.monotonic() - started <= 8


@pytest.mark.timeout(60)
def test_idle_http2_connection_is_closed_and_busy_ones_are_not(limited):
    """HTTP/2 with prior knowledge (served by SwiftNIO): an idle connection closes after the idle timeout; one
    whose stream waits on a slow function longer than that is kept until the answer."""
    d = limited
    with socket.create_connection((d.host, d.http_port), timeout=10) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + SETTINGS
        started = time.monotonic()
        s.settimeout(10)
        closed = False
        try:
            while time.monotonic() - started < 10:
                if s.recv(65536) == b"":
                    closed = True
                    break
        except (socket.timeout, ConnectionResetError):
            closed = True
        assert closed and 1.5 <= time.monotonic() - started <= 8, time.monotonic() - started
    # A stream waiting 3 s on its function, past the 2 s idle timeout, keeps its connection (curl, h2c).
    d.deploy(FUNCTIONS_DIR / "counter")
    p = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "30", "-o", "/dev/null", "-w",
                        "%{http_code} %{http_version}", f"{d.gateway}/counter/?sleep=3"], capture_output=True, text=True)
    assert p.stdout == "200 2", (p.stdout, p.stderr)


@pytest.mark.timeout(90)
def test_thrift_bytes_held_by_all_connections_are_capped(tmp_path):
    """--thrift-max-buffered caps what all connections together hold in unfinished Thrift messages: the connection
    that would take the total past it is closed, the others keep going, and the room comes back when a message
    completes."""
    budget, frame = 3 << 20, 4 << 20
    d = Apusd(tmp_path / "apusd", extra_args=("--thrift-max-buffered", str(budget), "--thrift-max-frame", str(frame),
                                              "--request-head-timeout", "60s", "--connection-idle-timeout", "60s"))
    try:
        d.start()
        name = b"nosuch"
        call = (0x80010001).to_bytes(4, "big") + len(name).to_bytes(4, "big") + name + (7).to_bytes(4, "big")
        body_length = 2 << 20
        # A framed call whose args are one binary field of about 2 MiB.
        args = bytes([11]) + (1).to_bytes(2, "big") + (body_length).to_bytes(4, "big")
        head = call + args
        total = len(head) + body_length + 1
        frame_header = total.to_bytes(4, "big")
        part = 1600 << 10

        first = socket.create_connection((d.host, d.thrift_port), timeout=10)
        first.sendall(frame_header + head + b"a" * part)
        time.sleep(0.5)
        second = socket.create_connection((d.host, d.thrift_port), timeout=10)
        second.sendall(frame_header + head + b"b" * part)  # 3.2 MiB together: past the 3 MiB budget
        assert closed_at_once(second, timeout=10), "the connection past the budget was kept"
        second.close()
        # The first one is untouched: it finishes its message and gets its answer (no such method).
        first.sendall(b"a" * (body_length - part) + b"\0")
        first.settimeout(10)
        reply = first.recv(65536)
        assert b"nosuch" in reply and b"unknown method" in reply, reply
        # Its message is whole, so its bytes are free again: another connection may hold as much.
        third = socket.create_connection((d.host, d.thrift_port), timeout=10)
        third.sendall(frame_header + head + b"c" * part)
        assert not closed_at_once(third, timeout=1), "the budget was not given back after the first message completed"
        third.close()
        first.close()
        assert d.running
        assert "--thrift-max-buffered" in d.log_tail(200)
    finally:
        d.teardown()


def h2_send_partial(client, stream_id: int, data: bytes):
    """Sends `data` on the stream as far as the flow-control windows allow, reading window updates meanwhile; stops
    early once the stream got a response or was reset (the gateway refused it)."""
    sent = 0
    deadline = time.monotonic() + 30
    while sent < len(data) and time.monotonic() < deadline:
        stream = client.streams[stream_id]
        if stream.headers or stream.reset is not None or stream.ended:
            break
        window = min(client.conn.local_flow_control_window(stream_id), client.conn.max_outbound_frame_size)
        if window <= 0:
            client.pump(0.05)
            continue
        chunk = data[sent:sent + window]
        client.conn.send_data(stream_id, chunk)
        client._send()
        sent += len(chunk)
        client.pump(0.005)
    return sent


@pytest.mark.timeout(180)
def test_http_body_bytes_held_by_all_connections_are_capped(tmp_path):
    """--http-max-buffered caps the request bytes all HTTP connections hold in memory together. Asynchronous bodies
    being collected (HTTP/1.1, HTTP/2, gRPC) are the clearest holders: with two 1.6 MiB partial bodies under a 3 MiB
    cap, the second is refused (429 / RESOURCE_EXHAUSTED), the first completes, and the room comes back."""
    import h2.connection  # noqa: F401  (h2_support needs it)

    from apus_testlib import write_headecho
    from grpc_support import ECHO_DIR
    from h2_support import H2Client

    budget, part = 3 << 20, 1600 << 10
    d = Apusd(tmp_path / "apusd", extra_args=("--http-max-buffered", str(budget), "--request-head-timeout", "60s",
                                              "--connection-idle-timeout", "60s"))
    try:
        d.start()
        d.deploy(write_headecho(tmp_path / "headecho"))
        d.deploy(ECHO_DIR)
        total = 2 << 20

        # HTTP/1.1: two submissions that have sent 1.6 MiB of 2 MiB each.
        head = (f"POST /async/headecho/job HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {total}\r\n\r\n").encode()
        first = socket.create_connection((d.host, d.http_port), timeout=10)
        first.sendall(head + b"a" * part)
        time.sleep(0.5)
        second = socket.create_connection((d.host, d.http_port), timeout=10)
        try:
            second.sendall(head + b"b" * part)
            second.settimeout(10)
            answer = second.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""  # closed while the client still sent: the 429 may be lost to the reset
        assert answer == b"" or answer.startswith(b"HTTP/1.1 429"), answer
        assert closed_at_once(second, timeout=10), "the connection past the budget was kept"
        second.close()
        first.sendall(b"a" * (total - part))
        first.settimeout(15)
        reply = first.recv(65536)
        assert reply.startswith(b"HTTP/1.1 202"), reply
        first.close()
        time.sleep(0.2)
        third = socket.create_connection((d.host, d.http_port), timeout=10)
        third.sendall(head + b"c" * part)
        assert not closed_at_once(third, timeout=1), "the budget was not given back after the first body completed"
        third.close()
        time.sleep(0.5)

        # HTTP/2 (h2c): the same with two streams on two connections.
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/async/headecho/job"),
                   (":authority", "x"), ("content-type", "application/octet-stream")]
        one, two = H2Client(d.http_port, connection_window=8 << 20), H2Client(d.http_port, connection_window=8 << 20)
        try:
            s1 = one.request(headers, end=False)
            assert h2_send_partial(one, s1, b"a" * part) == part
            time.sleep(0.3)
            s2 = two.request(headers, end=False)
            h2_send_partial(two, s2, b"b" * part)
            two.wait(s2)
            assert two.streams[s2].headers.get(":status") == "429", two.streams[s2].headers
            assert b"--http-max-buffered" in bytes(two.streams[s2].body)
            one.conn.send_data(s1, b"", end_stream=True)
            one._send()
            one.wait(s1)
            assert one.streams[s1].headers.get(":status") == "202", one.streams[s1].headers
        finally:
            one.close()
            two.close()
        time.sleep(0.5)

        # gRPC: asynchronous calls whose message is still arriving.
        def grpc_message_head(length: int) -> bytes:
            return b"\0" + length.to_bytes(4, "big")

        grpc_headers = [(":method", "POST"), (":scheme", "http"), (":path", "/echo.Echo/Get"), (":authority", "x"),
                        ("content-type", "application/grpc"), ("te", "trailers"), ("apus-invocation", "async")]
        one, two = H2Client(d.http_port, connection_window=8 << 20), H2Client(d.http_port, connection_window=8 << 20)
        try:
            g1 = one.request(grpc_headers, end=False)
            assert h2_send_partial(one, g1, grpc_message_head(total) + b"a" * part) == part + 5
            time.sleep(0.3)
            g2 = two.request(grpc_headers, end=False)
            h2_send_partial(two, g2, grpc_message_head(total) + b"b" * part)
            two.wait(g2)
            assert two.streams[g2].grpc_status == "8", (two.streams[g2].headers, two.streams[g2].trailers)
        finally:
            one.close()
            two.close()

        assert d.running
        assert "HTTP body buffer limit reached" in d.log_tail(400)
    finally:
        d.teardown()
