"""apus-sidecar against real downstream services (python http.server and grpcio processes) over loopback, with
`--registry static` upstreams from its YAML file. The test plays the function: it calls the downstream services
by name through the sidecar's outbound port over HTTP/1.1, HTTP/2 (curl, nghttp) and gRPC."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import grpc
import pytest

from sidecar_support import SIDECAR_BIN, Backend, Sidecar, free_port, get_json, http_request, parallel, wait_port

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "Examples" / "echo-python-grpc"))
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.skipif(not SIDECAR_BIN.exists(), reason=f"{SIDECAR_BIN} not built")

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


@pytest.fixture(scope="module")
def backends():
    web = [Backend("http", f"web-{i}").start() for i in range(3)]
    echo = [Backend("grpc", f"echo-{i}").start() for i in range(2)]
    yield {"web": web, "echo": echo}
    for b in web + echo:
        b.kill()


def base_config(backends, **extra) -> dict:
    outlier = {"consecutive_failures": 2, "base_ejection": "2s", "max_ejection_percent": 50}
    config = {
        "service": "tester",
        "upstreams": {
            "web": {
                "endpoints": [b.endpoint() for b in backends["web"]],
                "timeout": "3s",
                "retries": {"attempts": 3},
                "retry_budget": {"min_retries": 20},
                "outlier": outlier,
            },
            "retry-probe": {
                "endpoints": [b.endpoint() for b in backends["web"]],
                "retries": {"attempts": 3},
                "outlier": {"consecutive_failures": 100},
                "breaker": {"consecutive_failures": 100},
            },
            "sticky": {
                "endpoints": [b.endpoint() for b in backends["web"]],
                "balance": "consistent_hash",
                "hash_header": "x-user",
            },
            "echo-unsafe": {
                "endpoints": [b.endpoint() for b in backends["echo"]],
                "retries": {"attempts": 3},
                "outlier": {"consecutive_failures": 100},
            },
            "echo": {
                "endpoints": [b.endpoint() for b in backends["echo"]],
                "timeout": "2500ms",
                "retries": {"attempts": 3, "retry_safe_methods": ["/echo.Echo/Get"]},
                "outlier": outlier,
            },
        },
    }
    config.update(extra)
    return config


@pytest.fixture
def sidecar(tmp_path, backends):
    s = Sidecar(tmp_path, base_config(backends)).start()
    yield s
    s.stop()


def served_by(port, n, host="web", path="/echo"):
    counts = Counter()
    for _ in range(n):
        status, body = get_json(port, path, host)
        assert status == 200, body
        counts[body["server"]] += 1
    return counts


# MARK: outbound by protocol

def test_http1_by_host_round_robin(sidecar):
    counts = served_by(sidecar.outbound, 30)
    assert counts == {"web-0": 10, "web-1": 10, "web-2": 10}
    # Keep-alive: many requests on one client connection, upstream named by Host (its port ignored).
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.outbound, timeout=5)
    for i in range(5):
        conn.request("POST", f"/echo/{i}", body=b"x" * 1000, headers={"Host": f"web:{sidecar.outbound}"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 200 and body["path"] == f"/echo/{i}" and body["body"] == "x" * 1000
    conn.close()


def test_unknown_upstream_is_503_with_reason(sidecar):
    status, _, body = http_request(sidecar.outbound, "GET", "/", host="nobody-here")
    assert status == 503
    assert "no upstream named nobody-here" in json.loads(body)["error"]


def test_request_head_over_64_kib_is_431_however_it_arrives(sidecar):
    """A head over the limit is refused, also when all of it is there by the time the sidecar looks."""
    # Two header lines, each short enough for the endpoint's own per-line limit (Python's is 64 KiB), so only the
    # sidecar's limit on the whole head can refuse it.
    head = f"GET /echo/big HTTP/1.1\r\nHost: web\r\nX-Big-1: {'a' * 36000}\r\nX-Big-2: {'b' * 36000}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", sidecar.outbound), timeout=10) as s:
        s.sendall(head)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = s.recv(65536)
            if not chunk:
                break
            response += chunk
    assert response.startswith(b"HTTP/1.1 431"), response[:200]
    # The sidecar still serves.
    status, _, _ = http_request(sidecar.outbound, "GET", "/echo/after", host="web")
    assert status == 200


def test_http2_prior_knowledge_by_authority(sidecar):
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web", "-w", "\n%{http_version} %{http_code}",
                          f"http://127.0.0.1:{sidecar.outbound}/h2/path?q=1"], capture_output=True, text=True, timeout=20)
    body, _, tail = out.stdout.rpartition("\n")
    assert tail == "2 200", out
    echoed = json.loads(body)
    assert echoed["path"] == "/h2/path?q=1" and echoed["server"].startswith("web-")
    # A body over HTTP/2 (re-framed as HTTP/1.1 for the http.server endpoint).
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web", "--data-binary", "hello h2",
                          f"http://127.0.0.1:{sidecar.outbound}/post"], capture_output=True, text=True, timeout=20)
    assert json.loads(out.stdout)["body"] == "hello h2", out
    # A body larger than the 64 KiB replay copy, arriving while the endpoint connection opens.
    big = sidecar.tmp / "big.bin"
    big.write_bytes(b"z" * 300_000)
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web", "--data-binary", f"@{big}",
                          f"http://127.0.0.1:{sidecar.outbound}/big"], capture_output=True, text=True, timeout=20)
    assert len(json.loads(out.stdout).get("body", "")) == 300_000, out.stdout[:300]
    # nghttp names the upstream with :authority.
    out = subprocess.run(["nghttp", "-H", ":authority: web", f"http://127.0.0.1:{sidecar.outbound}/nghttp"],
                         capture_output=True, text=True, timeout=20)
    assert json.loads(out.stdout)["path"] == "/nghttp", out


def test_grpc_by_authority_and_metadata(sidecar):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.outbound}", options=[("grpc.default_authority", "echo")]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        served = Counter(stub.Get(echo_pb2.EchoRequest(text="hi"), timeout=5).served_by for _ in range(10))
        assert served == {"echo-0": 5, "echo-1": 5}
        assert [r.index for r in stub.Expand(echo_pb2.EchoRequest(text="s", repeat=3), timeout=5)] == [0, 1, 2]

        def slowly(texts):
            for t in texts:
                time.sleep(0.05)  # messages keep arriving after the endpoint stream is open
                yield echo_pb2.EchoRequest(text=t)
        collected = stub.Collect(slowly(["a", "b", "c"]), timeout=5)
        assert collected.text == "a+b+c" and collected.index == 3
        assert [r.text for r in stub.Update(slowly(["x", "y"]), timeout=5)] == ["X", "Y"]
        with pytest.raises(grpc.RpcError) as failure:
            stub.Get(echo_pb2.EchoRequest(fail_code=5, fail_message="nope"), timeout=5)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.outbound}") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = stub.Get(echo_pb2.EchoRequest(text="md"), metadata=[("apus-upstream", "echo")], timeout=5)
        assert reply.text == "md" and reply.served_by.startswith("echo-")


# MARK: resilience

def test_killed_endpoint_is_ejected_without_failed_calls_and_restored(sidecar, backends):
    victim = backends["web"][1]
    assert served_by(sidecar.outbound, 9)["web-1"] == 3
    victim.kill()
    try:
        counts = served_by(sidecar.outbound, 12)  # every call succeeds: failed attempts were retried
        state = sidecar.endpoint_state("web", victim.port)
        assert state["ejected"] is True and state["ejections"] >= 1, state
        counts += served_by(sidecar.outbound, 48)
        assert "web-1" not in counts and sum(counts.values()) == 60
        assert "apus_sidecar_upstream_ejections_total" in sidecar.metrics()
        assert re.search(r'apus_sidecar_upstream_retries_total\{upstream="web"\} [1-9]', sidecar.metrics())
    finally:
        victim.start()
    # Back after its ejection time: it serves again and is no longer ejected.
    deadline = time.time() + 15
    while time.time() < deadline:
        if served_by(sidecar.outbound, 6).get("web-1"):
            break
        time.sleep(0.3)
    else:
        pytest.fail("restarted endpoint never got traffic again")
    assert sidecar.endpoint_state("web", victim.port)["ejected"] is False


def test_killed_grpc_endpoint_retried(sidecar, backends):
    victim = backends["echo"][0]
    victim.kill()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.outbound}", options=[("grpc.default_authority", "echo")]) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            served = Counter(stub.Get(echo_pb2.EchoRequest(text="x"), timeout=5).served_by for _ in range(20))
        assert served == {"echo-1": 20}
        assert sidecar.endpoint_state("echo", victim.port)["ejected"] is True
    finally:
        victim.start()


def _hits(backends, test_id):
    total = 0
    for b in backends["web"]:
        status, body = get_json(b.port, f"/count?id={test_id}", "x")
        total += body["count"]
    return total


def test_retry_only_idempotent_methods(sidecar, backends):
    # GET answered 503 everywhere: retried up to 3 attempts in all.
    status, _, _ = http_request(sidecar.outbound, "GET", "/status/503", host="retry-probe", headers={"x-test-id": "get-1"})
    assert status == 503
    assert _hits(backends, "get-1") == 3
    # A POST is not idempotent: one attempt, the 503 goes back to the caller.
    status, _, _ = http_request(sidecar.outbound, "POST", "/status/503", host="retry-probe", headers={"x-test-id": "post-1"}, body=b"{}")
    assert status == 503
    assert _hits(backends, "post-1") == 1
    # 500 is not a retry status.
    status, _, _ = http_request(sidecar.outbound, "GET", "/status/500", host="retry-probe", headers={"x-test-id": "get-500"})
    assert status == 500 and _hits(backends, "get-500") == 1


def _grpc_calls(backends, text):
    total = 0
    for b in backends["echo"]:
        with grpc.insecure_channel(f"127.0.0.1:{b.port}") as channel:
            total += echo_pb2_grpc.EchoStub(channel).Get(echo_pb2.EchoRequest(text=f"count:{text}"), timeout=5).index
    return total


def test_grpc_unavailable_retried_only_when_declared_safe(sidecar, backends):
    for upstream, text, expected_calls in [("echo", "unavail-safe", 3), ("echo-unsafe", "unavail-unsafe", 1)]:
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.outbound}", options=[("grpc.default_authority", upstream)]) as channel:
            with pytest.raises(grpc.RpcError) as failure:
                echo_pb2_grpc.EchoStub(channel).Get(echo_pb2.EchoRequest(text=text, fail_code=14), timeout=5)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _grpc_calls(backends, text) == expected_calls, upstream


def test_consistent_hash_keeps_a_user_on_one_endpoint(sidecar):
    for user in ["ada", "grace", "edsger", "barbara"]:
        servers = {get_json(sidecar.outbound, "/", "sticky", headers={"x-user": user})[1]["server"] for _ in range(6)}
        assert len(servers) == 1, (user, servers)
    spread = {get_json(sidecar.outbound, "/", "sticky", headers={"x-user": f"user-{i}"})[1]["server"] for i in range(30)}
    assert len(spread) == 3


def test_http2_get_retried_after_endpoint_killed(sidecar, backends):
    victim = backends["web"][0]
    victim.kill()
    try:
        for i in range(6):
            out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://127.0.0.1:{sidecar.outbound}/h2-{i}"], capture_output=True, text=True, timeout=20)
            assert out.stdout == "200", out
    finally:
        victim.start()


def test_retry_budget_caps_retries(tmp_path, backends):
    config = base_config(backends)
    config["upstreams"]["retry-probe"]["retry_budget"] = {"ratio": 0.2, "min_retries": 2, "window": "30s"}
    s = Sidecar(tmp_path, config).start()
    try:
        for i in range(10):
            http_request(s.outbound, "GET", "/status/503", host="retry-probe", headers={"x-test-id": "budget"})
        # 10 requests: retries limited to max(2, 20% of 10) = 2, so 12 attempts rather than 30.
        assert _hits(backends, "budget") == 12
    finally:
        s.stop()


def test_breaker_opens_fast_and_closes_after_cool_down(tmp_path, backends):
    dead_port = free_port()
    config = base_config(backends)
    config["upstreams"]["fragile"] = {
        "endpoints": [{"address": "127.0.0.1", "port": dead_port}],
        "breaker": {"consecutive_failures": 3, "cool_down": "1s"},
        "retries": {"attempts": 1},
    }
    s = Sidecar(tmp_path, config).start()
    revived = None
    try:
        for _ in range(3):
            status, _, body = http_request(s.outbound, "GET", "/", host="fragile")
            assert status == 503 and "connect" in json.loads(body)["error"]
        start = time.monotonic()
        status, headers, body = http_request(s.outbound, "GET", "/", host="fragile")
        assert status == 503 and "circuit breaker open" in json.loads(body)["error"]
        assert time.monotonic() - start < 0.5
        assert s.upstreams()["fragile"]["breaker"] == "open"
        assert 'apus_sidecar_upstream_breaker_open{upstream="fragile"} 1' in s.metrics()
        revived = Backend("http", "revived", dead_port).start()
        time.sleep(1.2)
        status, body = get_json(s.outbound, "/", "fragile")
        assert status == 200 and body["server"] == "revived"
        assert s.upstreams()["fragile"]["breaker"] == "closed"
        assert 'apus_sidecar_upstream_breaker_open{upstream="fragile"} 0' in s.metrics()
    finally:
        if revived:
            revived.kill()
        s.stop()


def test_max_requests_refuses_at_once(tmp_path, backends):
    config = base_config(backends)
    config["upstreams"]["narrow"] = {"endpoints": [backends["web"][0].endpoint()], "max_requests": 2}
    s = Sidecar(tmp_path, config).start()
    try:
        results = parallel(6, lambda i: http_request(s.outbound, "GET", "/sleep/600", host="narrow")[0])
        assert sorted(results).count(200) == 2 and sorted(results).count(503) == 4, results
    finally:
        s.stop()


# MARK: deadlines and tracing

def test_deadline_and_trace_headers_propagate(sidecar):
    before = int(time.time() * 1000)
    status, body = get_json(sidecar.outbound, "/echo", "web")
    seen = body["headers"]
    assert TRACEPARENT.match(seen["traceparent"]), seen
    assert re.fullmatch(r"[0-9a-f]{16}", seen["x-request-id"])
    assert seen["x-apus-caller"] == "tester"
    assert before + 2500 <= int(seen["x-apus-deadline-ms"]) <= before + 3500  # the upstream's 3 s timeout
    # The caller's own trace context and request id pass through unchanged; an earlier deadline wins.
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    mine = int(time.time() * 1000) + 800
    status, body = get_json(sidecar.outbound, "/echo", "web", headers={
        "traceparent": tp, "tracestate": "vendor=1", "x-request-id": "req-42", "X-Apus-Deadline-Ms": str(mine)})
    seen = body["headers"]
    assert seen["traceparent"] == tp and seen["tracestate"] == "vendor=1" and seen["x-request-id"] == "req-42"
    assert int(seen["x-apus-deadline-ms"]) <= mine
    # Past the upstream's timeout: 504 from the sidecar.
    start = time.monotonic()
    status, _, body = http_request(sidecar.outbound, "GET", "/sleep/5000", host="web")
    assert status == 504 and "did not answer within" in json.loads(body)["error"]
    assert 2.8 < time.monotonic() - start < 4.5


def test_grpc_deadline_propagates(sidecar):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.outbound}", options=[("grpc.default_authority", "echo")]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = stub.Get(echo_pb2.EchoRequest(text="t"), timeout=2)
        metadata = json.loads(reply.payload)
        assert TRACEPARENT.match(metadata["traceparent"])
        # The caller's 2 s deadline (under the upstream's 2.5 s) arrives as grpc-timeout with the time left.
        assert 1.0 < metadata["time-remaining"] <= 2.0, metadata
        assert int(metadata["x-apus-deadline-ms"]) <= time.time() * 1000 + 2000
        # Past the upstream's 2.5 s timeout (the client allows 20 s): DEADLINE_EXCEEDED from the sidecar.
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            stub.Get(echo_pb2.EchoRequest(sleep_ms=4000), timeout=20)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer within" in failure.value.details()
        assert 2.3 < time.monotonic() - start < 3.8


# MARK: inbound

@pytest.fixture
def app(backends):
    a = Backend("http", "app").start()
    yield a
    a.kill()


def inbound_sidecar(tmp_path, backends, app, inbound: dict, service="shop", extra_args=None):
    config = base_config(backends, inbound=inbound)
    args = ["--inbound-port", "0", "--app-port", str(app.port), "--app-protocol", "http", "--service", service,
            "--instance-id", "shop-1", *(extra_args or [])]
    return Sidecar(tmp_path, config, args).start()


def test_inbound_concurrency_limit(tmp_path, backends, app):
    s = inbound_sidecar(tmp_path, backends, app, {"max_concurrency": 2})
    try:
        results = parallel(6, lambda i: http_request(s.inbound, "GET", "/sleep/700", host="shop"))
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 200, 503, 503, 503, 503], statuses
        refused = next(r for r in results if r[0] == 503)
        assert "max_concurrency" in json.loads(refused[2])["error"]
        status, body = get_json(s.inbound, "/after", "shop")  # slots come back
        assert status == 200 and body["server"] == "app"
    finally:
        s.stop()


def test_inbound_rate_limit_per_caller(tmp_path, backends, app):
    s = inbound_sidecar(tmp_path, backends, app, {"rate_limit": {"rps": 1, "burst": 3}})
    try:
        alice = [http_request(s.inbound, "GET", "/", host="shop", headers={"x-apus-caller": "alice"})[0] for _ in range(5)]
        assert alice == [200, 200, 200, 429, 429]
        bob = http_request(s.inbound, "GET", "/", host="shop", headers={"x-apus-caller": "bob"})
        assert bob[0] == 200  # another caller has its own bucket
        assert json.loads(bob[2])["headers"]["x-apus-caller"] == "bob"  # passed on to the app
        time.sleep(1.1)
        assert http_request(s.inbound, "GET", "/", host="shop", headers={"x-apus-caller": "alice"})[0] == 200
        # HTTP/2 into the inbound port (to the HTTP/1.1 app), under the same per-caller buckets.
        codes = []
        for _ in range(4):
            out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "x-apus-caller: carol", "-o", "/dev/null",
                                  "-w", "%{http_code}", f"http://127.0.0.1:{s.inbound}/h2"], capture_output=True, text=True, timeout=20)
            codes.append(out.stdout)
        assert codes == ["200", "200", "200", "429"], codes
    finally:
        s.stop()


def test_inbound_grpc_app(tmp_path, backends):
    app = Backend("grpc", "grpc-app").start()
    config = base_config(backends, inbound={"max_concurrency": 1})
    s = Sidecar(tmp_path, config, ["--inbound-port", "0", "--app-port", str(app.port), "--app-protocol", "grpc",
                                   "--no-register"]).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.inbound}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            assert stub.Get(echo_pb2.EchoRequest(text="in"), timeout=5).served_by == "grpc-app"
            slow = stub.Get.future(echo_pb2.EchoRequest(sleep_ms=800), timeout=5)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as failure:
                stub.Get(echo_pb2.EchoRequest(text="excess"), timeout=5)
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert slow.result().served_by == "grpc-app"
    finally:
        s.stop()
        app.kill()


def test_registration_and_health_reporting(tmp_path, backends, app):
    """The sidecar registers the app it fronts (in the static registry, its own): calling its service name
    through the outbound port goes registry → inbound port → app. When the app dies the health check reports it
    unhealthy and the endpoint stops receiving traffic."""
    s = inbound_sidecar(tmp_path, backends, app, {"health_check": {"kind": "http", "path": "/healthz", "interval": "200ms",
                                                                   "unhealthy_after": 1}})
    try:
        # Registered unhealthy until the first probe of the app passes (503 "no healthy endpoints"), then healthy.
        deadline = time.time() + 5
        while True:
            status, _, raw = http_request(s.outbound, "GET", "/through-the-mesh", host="shop")
            if status == 200 or time.time() > deadline:
                break
            assert status == 503, raw
            time.sleep(0.05)
        body = json.loads(raw)
        assert status == 200 and body["server"] == "app" and body["headers"]["x-apus-caller"] == "shop"
        state = s.upstreams()["shop"]["endpoints"]
        assert [(e["id"], e["port"], e["healthy"]) for e in state] == [("shop-1", s.inbound, True)]
        app.kill()
        deadline = time.time() + 5
        while time.time() < deadline and s.upstreams()["shop"]["endpoints"][0]["healthy"]:
            time.sleep(0.1)
        assert s.upstreams()["shop"]["endpoints"][0]["healthy"] is False
        status, _, body = http_request(s.outbound, "GET", "/", host="shop")
        assert status == 503 and "no healthy endpoints" in json.loads(body)["error"]
        app.start()
        deadline = time.time() + 5
        while time.time() < deadline and not s.upstreams()["shop"]["endpoints"][0]["healthy"]:
            time.sleep(0.1)
        assert get_json(s.outbound, "/", "shop")[0] == 200
    finally:
        s.stop()
    log = s.log_path.read_text()
    assert log.index("deregistered") < log.index("drained")


# MARK: signals

def test_sighup_reload_keeps_open_connections(tmp_path, backends):
    config = base_config(backends)
    s = Sidecar(tmp_path, config).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.outbound, timeout=5)
        conn.request("GET", "/one", headers={"Host": "web"})
        r = conn.getresponse()
        assert r.status == 200
        r.read()
        sock = conn.sock
        # A new upstream and a tighter timeout for web.
        config["upstreams"]["newcomer"] = {"endpoints": [backends["web"][2].endpoint()]}
        config["upstreams"]["web"]["timeout"] = "1s"
        s.write_config(config)
        s.signal(signal.SIGHUP)
        deadline = time.time() + 5
        while "newcomer" not in s.upstreams() and time.time() < deadline:
            time.sleep(0.1)
        conn.request("GET", "/two", headers={"Host": "newcomer"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["server"] == "web-2"
        assert conn.sock is sock  # the same keep-alive connection
        conn.request("GET", "/sleep/1500", headers={"Host": "web"})
        r = conn.getresponse()
        assert r.status == 504  # the reloaded 1 s timeout
        r.read()
        # A broken file is refused and the running configuration stays.
        s.config_path.write_text("upstreams: {web: {balance: sideways}}")
        s.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert get_json(s.outbound, "/", "newcomer")[0] == 200
        assert "upstreams.web.balance" in s.log_tail()
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests(tmp_path, backends, app):
    s = inbound_sidecar(tmp_path, backends, app, {})
    results = []
    import threading
    t = threading.Thread(target=lambda: results.append(http_request(s.inbound, "GET", "/sleep/1000", host="shop")))
    t.start()
    time.sleep(0.3)
    start = time.monotonic()
    s.signal(signal.SIGTERM)
    t.join(10)
    assert results and results[0][0] == 200, results
    assert s.proc.wait(10) == 0
    assert 0.5 < time.monotonic() - start < 5
    # The inbound port no longer accepts.
    with pytest.raises(OSError):
        __import__("socket").create_connection(("127.0.0.1", s.inbound), timeout=1)
    log = s.log_path.read_text()
    assert log.index("deregistered") < log.index("drained")


@pytest.mark.parametrize("args, message", [
    (["--outbound-port", "-1"], "--outbound-port must be a port number (0-65535), got -1"),
    (["--outbound-port", "70000"], "--outbound-port must be a port number (0-65535), got 70000"),
    (["--outbound-port", "0", "--admin-port", "65536"], "--admin-port must be a port number (0-65535), got 65536"),
    (["--outbound-port", "0", "--event-loops", "-2"], "--event-loops must be at least 1"),
])
def test_bad_port_flags_are_refused(args, message):
    out = subprocess.run([str(SIDECAR_BIN), "--registry", "static", *args], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0, out.stdout + out.stderr
    assert message in out.stderr, out.stderr


def test_bad_config_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams:\n  web:\n    retries: {attempts: 99}\n")
    out = subprocess.run([str(SIDECAR_BIN), "--registry", "static", "--config", str(path), "--outbound-port", "0"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "upstreams.web.retries.attempts" in out.stderr
    out = subprocess.run([str(SIDECAR_BIN), "--registry", "zookeeper://127.0.0.1:2181", "--outbound-port", "0"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "zookeeper://127.0.0.1:2181" in out.stderr, out.stderr
