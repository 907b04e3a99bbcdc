"""gRPC through the gateway: a python grpcio client calls Examples/echo-python-grpc (runtime python3, protocol grpc)
on the gateway's HTTP port (h2c with prior knowledge), routed by the service name in `:path`.

Covers the four call shapes, large messages, 100 concurrent calls on one connection, metadata both ways, status
propagation, grpc-timeout, client cancel (grpcio, and a raw RST_STREAM in the middle of a connection), unknown
method/service, service ownership at deploy, scale from zero, the gateway's grpc.health.v1 service, gRPC calls,
HTTP requests and health checks mixed on one connection, `runtime: command` gRPC servers, gRPC over TLS, and
flow control towards slow clients.
"""

from __future__ import annotations

import hashlib
import os
import queue
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apus_testlib import Apusd, copy_function
from h2_support import H2Client, grpc_messages
from grpc_support import (
    CALL_TIMEOUT,
    ECHO_DIR,
    ECHO_FUNCTION,
    ECHO_SERVICE,
    connections_to,
    echo_pb2,
    echo_stub,
    insecure_channel,
    metadata_dict,
    queued_requests,
    req,
    secure_channel,
    wait_for_log,
)

MiB = 1024 * 1024
GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def live_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if not any(s in str(i.get("state", "")).lower() for s in GONE_STATES)]


def wait_until_in_flight(apusd, name, timeout=5.0):
    """Give a started call the time to reach the instance: until the API shows a call in flight (best effort)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(i.get("inFlight") or 0) > 0 for i in live_instances(apusd, name)):
            return
        time.sleep(0.05)


def wait_until_idle(apusd, name, timeout=10.0):
    """Until no instance of the function has a call in flight: the calls' slots were given back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(int(i.get("inFlight") or 0) == 0 for i in live_instances(apusd, name)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} still has calls in flight: {live_instances(apusd, name)}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def echo_fn(deployed):
    return deployed.example(ECHO_FUNCTION)


@pytest.fixture(scope="module")
def channel(apusd):
    ch = insecure_channel(apusd)
    yield ch
    ch.close()


@pytest.fixture
def stub(channel, echo_fn):
    return echo_stub(channel)


# ---- the four call shapes ------------------------------------------------------------------------------------


def test_unary(apusd, stub):
    r, call = stub.Get.with_call(req(text="hello"), timeout=CALL_TIMEOUT)
    assert call.code() == grpc.StatusCode.OK
    assert (r.text, r.index, r.served_by) == ("hello", 0, "python"), r
    assert r.instance, "the response names no instance ($APUS_INSTANCE)"
    listed = {i["id"] for i in apusd.api_json("GET", f"/v1/functions/{ECHO_FUNCTION}/instances")["instances"]}
    assert r.instance in listed, f"instance {r.instance!r} is not among the function's instances {listed}"


def test_server_streaming(stub):
    responses = list(stub.Expand(req(text="fan", repeat=5), timeout=CALL_TIMEOUT))
    assert [m.index for m in responses] == [0, 1, 2, 3, 4], responses
    assert all(m.text == "fan" and m.served_by == "python" for m in responses), responses


def test_client_streaming(stub):
    texts = ["one", "two", "three", "four"]
    r = stub.Collect(iter([req(text=t) for t in texts]), timeout=CALL_TIMEOUT)
    assert r.text == "one two three four" and r.index == 4, r


def test_bidirectional_streaming_message_by_message(stub):
    """Each response arrives before the next request is sent: messages pass through one by one, the stream is
    not buffered until the client half-closes."""
    outgoing: queue.Queue = queue.Queue()

    responses = stub.Update(queued_requests(outgoing), timeout=CALL_TIMEOUT)
    try:
        for i in range(5):
            outgoing.put(req(text=f"m{i}"))
            m = next(responses)
            assert (m.index, m.text) == (i, f"m{i}"), m
    finally:
        outgoing.put(None)
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


# ---- sizes and concurrency -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_large_messages(stub):
    payload = os.urandom(5 * MiB)
    r = stub.Get(req(text="big-request", payload=payload), timeout=CALL_TIMEOUT)
    assert len(r.payload) == len(payload) and sha(r.payload) == sha(payload), "5 MiB payload not echoed intact"

    r = stub.Get(req(text="big-response", response_bytes=5 * MiB), timeout=CALL_TIMEOUT)
    assert len(r.payload) == 5 * MiB and r.payload == bytes(5 * MiB), "response not padded to 5 MiB of zeros"

    # Large messages in streams, both directions.
    streamed = list(stub.Expand(req(text="big-stream", repeat=3, response_bytes=5 * MiB), timeout=CALL_TIMEOUT))
    assert [len(m.payload) for m in streamed] == [5 * MiB] * 3
    payloads = [os.urandom(5 * MiB) for _ in range(2)]
    echoed = list(stub.Update(iter([req(text=f"u{i}", payload=p) for i, p in enumerate(payloads)]),
                              timeout=CALL_TIMEOUT))
    assert [sha(m.payload) for m in echoed] == [sha(p) for p in payloads]


@pytest.mark.timeout(120)
def test_100_concurrent_calls_on_one_connection(apusd, echo_fn):
    """100 calls in flight at once on one channel: all succeed, over a single HTTP/2 connection (multiplexed)."""
    before = connections_to(apusd.http_port)
    # A channel of its own (not sharing subchannels with the module's channel).
    ch = insecure_channel(apusd, extra_options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        stub = echo_stub(ch)
        assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"
        start = time.monotonic()
        futures = [stub.Get.future(req(text=f"c{i}", sleep_ms=300), timeout=90) for i in range(100)]
        during = connections_to(apusd.http_port)
        results = [f.result() for f in futures]
        elapsed = time.monotonic() - start
    finally:
        ch.close()
    assert [r.text for r in results] == [f"c{i}" for i in range(100)]
    assert during >= 1 and during - before <= 1, (
        f"the channel used {during - before} new connections for 100 concurrent calls (expected one)")
    # 100 x 0.3 s one after the other would take 30 s; concurrent calls take about 0.3 s (generous bound).
    assert elapsed < 20, f"100 concurrent calls took {elapsed:.1f}s: they were not served concurrently"


# ---- metadata and status -------------------------------------------------------------------------------------


BIN_VALUE = b"\x00\x01\xfe\xff binary \xc3\xa9"
CUSTOM_METADATA = [("x-custom", "hello metadata"), ("k-bin", BIN_VALUE), ("trace-id", "abc-123")]


def _assert_echoed(md: dict, where: str):
    assert md.get("echo-x-custom") == "hello metadata", f"{where}: {md}"
    assert md.get("echo-trace-id") == "abc-123", f"{where}: {md}"
    assert md.get("echo-k-bin") == BIN_VALUE, f"{where}: {md}"


def test_custom_metadata_echoed_both_ways(stub):
    r, call = stub.Get.with_call(req(text="md"), metadata=CUSTOM_METADATA, timeout=CALL_TIMEOUT)
    assert r.text == "md"
    _assert_echoed(metadata_dict(call.initial_metadata()), "unary initial metadata")
    _assert_echoed(metadata_dict(call.trailing_metadata()), "unary trailing metadata")

    responses = stub.Expand(req(text="md", repeat=2), metadata=CUSTOM_METADATA, timeout=CALL_TIMEOUT)
    _assert_echoed(metadata_dict(responses.initial_metadata()), "streaming initial metadata")
    assert len(list(responses)) == 2
    _assert_echoed(metadata_dict(responses.trailing_metadata()), "streaming trailing metadata")


@pytest.mark.parametrize("message", ["precondition failed: try again later", "überfällig ✓ 日本語 100%"])
def test_status_code_and_message_propagate(stub, message):
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(req(text="fail", fail_code=9, fail_message=message), metadata=[("x-custom", "on-error")],
                 timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert err.value.details() == message
    # Metadata set before the failure travels with the status (a Trailers-Only response).
    assert metadata_dict(err.value.trailing_metadata()).get("echo-x-custom") == "on-error", err.value


def test_status_after_streamed_messages(stub):
    """A stream that fails after sending messages: the client gets the messages, then the status."""
    responses = stub.Update(iter([req(text="ok"), req(text="bad", fail_code=5, fail_message="gone away")]),
                            timeout=CALL_TIMEOUT)
    first = next(responses)
    assert (first.index, first.text) == (0, "ok")
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "gone away", err.value

    with pytest.raises(grpc.RpcError) as err:
        list(stub.Expand(req(text="x", repeat=3, fail_code=8, fail_message="too much"), timeout=CALL_TIMEOUT))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details() == "too much"


# ---- deadlines and cancellation --------------------------------------------------------------------------------


def test_grpc_timeout_gives_deadline_exceeded(apusd, stub):
    assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"  # an instance is up
    text = unique("deadline")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(req(text=text, sleep_ms=2000), timeout=0.1)
    elapsed = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    # About 100 ms; generous bound (tests never judge speed), well below the function's 2 s.
    assert elapsed < 1.5, f"a 100 ms deadline was answered after {elapsed:.2f}s"
    # The instance learns that the call is over (grpc-timeout or RST_STREAM) and stops sleeping.
    wait_for_log(apusd, ECHO_FUNCTION, f"cancelled Get {text}")


def test_client_cancel_reaches_the_function(apusd, stub):
    assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"

    unary_text = unique("cancel-unary")
    future = stub.Get.future(req(text=unary_text, sleep_ms=20000), timeout=CALL_TIMEOUT)
    wait_until_in_flight(apusd, ECHO_FUNCTION)
    time.sleep(0.3)
    assert future.cancel()
    wait_for_log(apusd, ECHO_FUNCTION, f"cancelled Get {unary_text}")

    stream_text = unique("cancel-stream")
    responses = stub.Expand(req(text=stream_text, sleep_ms=20000, repeat=3), timeout=CALL_TIMEOUT)
    wait_until_in_flight(apusd, ECHO_FUNCTION)
    time.sleep(0.3)
    responses.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(responses)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_for_log(apusd, ECHO_FUNCTION, f"cancelled Expand {stream_text}")

    bidi_text = unique("cancel-bidi")
    outgoing: queue.Queue = queue.Queue()

    responses = stub.Update(queued_requests(outgoing), timeout=CALL_TIMEOUT)
    outgoing.put(req(text=bidi_text, sleep_ms=20000))
    wait_until_in_flight(apusd, ECHO_FUNCTION)
    time.sleep(0.3)
    responses.cancel()
    outgoing.put(None)
    wait_for_log(apusd, ECHO_FUNCTION, f"cancelled Update {bidi_text}")
    # Every cancelled call gave its slot back.
    wait_until_idle(apusd, ECHO_FUNCTION)


def test_client_reset_mid_stream_reaches_the_function_and_frees_the_slot(apusd, stub):
    """A raw RST_STREAM(CANCEL) on one call of a connection: the function hears the cancel, the slot comes back,
    and the connection's other calls (one before, one after) are answered."""
    assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"
    client = H2Client(apusd.http_port)
    try:
        text = unique("reset-raw")
        before = client.grpc_call("/echo.Echo/Get", req(text="before").SerializeToString())
        doomed = client.grpc_call("/echo.Echo/Expand", req(text=text, sleep_ms=20000, repeat=2).SerializeToString())
        client.wait(before)
        wait_until_in_flight(apusd, ECHO_FUNCTION)
        time.sleep(0.3)
        client.reset(doomed)
        wait_for_log(apusd, ECHO_FUNCTION, f"cancelled Expand {text}")
        wait_until_idle(apusd, ECHO_FUNCTION)
        after = client.grpc_call("/echo.Echo/Get", req(text="after").SerializeToString())
        client.wait(after)
        for stream_id, expected in ((before, "before"), (after, "after")):
            stream = client.streams[stream_id]
            assert stream.grpc_status == "0", (stream.headers, stream.trailers)
            [message] = grpc_messages(bytes(stream.body))
            assert echo_pb2.EchoResponse.FromString(message).text == expected
        assert client.goaway is None
    finally:
        client.close()


def test_grpc_http_and_health_mixed_on_one_connection(apusd, deployed, echo_fn):
    """gRPC calls to a function (unary and server streaming), HTTP requests to an HTTP function (one for no
    function), a health check and a call to an unknown service, interleaved on one HTTP/2 connection, three rounds:
    every stream is answered."""
    deployed.example("hello-python")
    client = H2Client(apusd.http_port)
    try:
        for round_ in range(3):
            unary = client.grpc_call("/echo.Echo/Get", req(text=f"mixed-{round_}").SerializeToString())
            http = client.get(f"/hello-python/?name=Mixed{round_}")
            health = client.grpc_call("/grpc.health.v1.Health/Check",
                                      health_pb2.HealthCheckRequest(service=ECHO_SERVICE).SerializeToString())
            expand = client.grpc_call("/echo.Echo/Expand", req(text="x", repeat=3).SerializeToString())
            http_missing = client.get("/no-such-function-here/")
            unary2 = client.grpc_call("/echo.Echo/Get", req(text=f"again-{round_}").SerializeToString(),
                                      metadata=[("apus-function", ECHO_FUNCTION)])
            unknown = client.grpc_call("/nosuch.Service/Get", b"")
            client.wait(unary, http, health, expand, http_missing, unary2, unknown)

            s = client.streams
            assert s[unary].grpc_status == "0" and s[unary].headers.get("apus-request-id")
            assert echo_pb2.EchoResponse.FromString(grpc_messages(bytes(s[unary].body))[0]).text == f"mixed-{round_}"
            assert echo_pb2.EchoResponse.FromString(grpc_messages(bytes(s[unary2].body))[0]).text == f"again-{round_}"
            assert s[http].headers[":status"] == "200" and f"Mixed{round_}".encode() in s[http].body, s[http].body
            assert s[http_missing].headers[":status"] == "404"
            assert s[health].grpc_status == "0"
            status = health_pb2.HealthCheckResponse.FromString(grpc_messages(bytes(s[health].body))[0]).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert [echo_pb2.EchoResponse.FromString(m).index for m in grpc_messages(bytes(s[expand].body))] == [0, 1, 2]
            assert s[unknown].grpc_status == "12"  # UNIMPLEMENTED, Trailers-Only
        assert client.goaway is None
    finally:
        client.close()


# ---- routing -------------------------------------------------------------------------------------------------


def test_unknown_method_and_unknown_service_are_unimplemented(channel, echo_fn):
    for path in ("/echo.Echo/NoSuchMethod", "/nosuch.Service/Call", "/Bare/Call"):
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(path)(b"", timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, (path, err.value)
    with pytest.raises(grpc.RpcError) as err:
        list(channel.stream_stream("/nosuch.Service/Chat")(iter([b"x"]), timeout=CALL_TIMEOUT))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value


def test_a_function_of_another_protocol_is_refused_with_its_protocol_named(apusd, deployed, channel, echo_fn):
    """One protocol check for every edge: a gRPC call pinned to an HTTP function is UNIMPLEMENTED, an HTTP/1.1 or
    HTTP/2 request to a gRPC function is 400; each says what the function serves."""
    deployed.example("hello-python")
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/echo.Echo/Get")(b"", metadata=[("apus-function", "hello-python")], timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
    assert "function hello-python serves http, not grpc" in err.value.details(), err.value.details()
    r = apusd.get(f"/{ECHO_FUNCTION}/")
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "wrong_protocol", r.text
    assert f"function {ECHO_FUNCTION} serves grpc, not http; call it with a grpc client" in r.text, r.text
    client = H2Client(apusd.http_port)
    try:
        stream = client.request([(":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{apusd.http_port}"),
                                 (":path", f"/{ECHO_FUNCTION}/")])
        client.wait(stream)
        assert client.streams[stream].headers[":status"] == "400"
        assert b"serves grpc, not http" in bytes(client.streams[stream].body)
    finally:
        client.close()


def test_apus_function_metadata_pins_the_function(stub):
    r = stub.Get(req(text="pinned"), metadata=[("apus-function", ECHO_FUNCTION)], timeout=CALL_TIMEOUT)
    assert r.text == "pinned" and r.served_by == "python"


def test_service_owned_by_another_function_is_refused_at_deploy(apusd, echo_fn, deployed):
    dup = copy_function(ECHO_DIR, deployed.scratch / unique("echo-dup"), name="echo-dup")
    rc, out, err = apusd.cli("deploy", dup)
    assert rc != 0, f"a second function serving {ECHO_SERVICE} was deployed:\n{out}{err}"
    text = out + err
    assert ECHO_SERVICE in text and ECHO_FUNCTION in text, f"the refusal names neither service nor owner: {text!r}"
    assert apusd.api_call("GET", "/v1/functions/echo-dup").status == 404


RAW_GRPC_SERVER = r'''
import os, signal, threading
from concurrent import futures
import grpc

def reverse(request, context):
    return request[::-1]

def who(request, context):
    return os.environ["APUS_FUNCTION"].encode()

handlers = grpc.method_handlers_generic_handler("apus.test.Raw", {
    "Reverse": grpc.unary_unary_rpc_method_handler(reverse),
    "Who": grpc.unary_unary_rpc_method_handler(who),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handlers,))
server.add_insecure_port("127.0.0.1:" + os.environ["APUS_PORT"])
server.start()
print("raw grpc server listening", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
while not stop.wait(0.5):
    pass
server.stop(2).wait()
'''


def test_command_runtime_grpc_server(apusd, channel, deployed, echo_fn):
    """Any gRPC server on $APUS_PORT runs as `runtime: command`; calls reach it by its service name, beside the
    echo function on the same channel."""
    fn = deployed.scratch / "grpc-raw"
    fn.mkdir(exist_ok=True)
    (fn / "server.py").write_text(RAW_GRPC_SERVER)
    (fn / "apus.yaml").write_text(
        "name: grpc-raw\nruntime: command\ncommand: [\"/usr/bin/python3\", \"server.py\"]\nprotocol: grpc\n"
        "grpc:\n  services: [apus.test.Raw]\nconcurrency: 4\n")
    deployed(fn)
    assert channel.unary_unary("/apus.test.Raw/Reverse")(b"abc", timeout=CALL_TIMEOUT) == b"cba"
    assert channel.unary_unary("/apus.test.Raw/Who")(b"", timeout=CALL_TIMEOUT) == b"grpc-raw"
    assert echo_stub(channel).Get(req(text="beside"), timeout=CALL_TIMEOUT).served_by == "python"
    with pytest.raises(grpc.RpcError) as err:  # unknown method of a known service: answered by the instance
        channel.unary_unary("/apus.test.Raw/Nope")(b"", timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_function_that_cannot_start_gives_unavailable(apusd, channel, deployed):
    fn = deployed.scratch / "grpc-broken"
    fn.mkdir(exist_ok=True)
    (fn / "main.py").write_text("import module_that_does_not_exist  # noqa\n\n\ndef register(server):\n    pass\n")
    (fn / "apus.yaml").write_text(
        "name: grpc-broken\nruntime: python3\nhandler: main.register\nprotocol: grpc\n"
        "grpc:\n  services: [apus.test.Broken]\ntimeout: 20s\n")
    deployed(fn)
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/apus.test.Broken/Call")(b"", timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    logs = apusd.cli_ok("logs", "grpc-broken")
    assert "module_that_does_not_exist" in logs, logs


@pytest.mark.timeout(120)
def test_full_queue_sheds_with_resource_exhausted(tmp_path):
    """One slot and a queue of 2: of 8 simultaneous slow calls 3 are served, the rest get RESOURCE_EXHAUSTED."""
    daemon = Apusd(tmp_path / "apusd", extra_args=("--queue-length", "2"))
    try:
        daemon.start()
        fn = copy_function(ECHO_DIR, tmp_path / "single", name="echo-single",
                           subs=[(r"^concurrency:.*$", "concurrency: 1\nscale: {min: 0, max: 1}")])
        daemon.deploy(fn)
        ch = insecure_channel(daemon)
        try:
            stub = echo_stub(ch)
            assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"
            futures = [stub.Get.future(req(text=f"q{i}", sleep_ms=1000), timeout=60) for i in range(8)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result().text)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())
        finally:
            ch.close()
    finally:
        daemon.teardown()
    served = [o for o in outcomes if isinstance(o, str)]
    shed = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(served) == 3 and len(shed) == 5, outcomes


@pytest.mark.timeout(120)
def test_function_scaled_to_zero_serves_its_first_streaming_call(apusd, stub):
    assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"
    deadline = time.monotonic() + 60
    while live_instances(apusd, ECHO_FUNCTION):  # the idle instance stops (apusd --idle-timeout 3s here)
        assert time.monotonic() < deadline, "the idle echo instance (scale.min 0) was never stopped"
        time.sleep(0.3)

    responses = stub.Expand(req(text="cold", repeat=5), timeout=CALL_TIMEOUT)
    got = [(m.index, m.text) for m in responses]
    assert got == [(i, "cold") for i in range(5)], got
    assert responses.code() == grpc.StatusCode.OK
    assert live_instances(apusd, ECHO_FUNCTION), "no instance is listed after the cold call was served"


# ---- health --------------------------------------------------------------------------------------------------


def test_health_checks(channel, echo_fn):
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service=ECHO_SERVICE), timeout=CALL_TIMEOUT).status == serving
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nosuch.Service"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value


# ---- TLS -----------------------------------------------------------------------------------------------------


def test_grpc_over_tls(tls_apusd):
    tls_apusd.deploy(ECHO_DIR)
    ch = secure_channel(tls_apusd, tls_apusd.cert_path)
    try:
        r = echo_stub(ch).Get(req(text="over tls"), timeout=CALL_TIMEOUT)
        assert r.text == "over tls" and r.served_by == "python"
        assert [m.index for m in echo_stub(ch).Expand(req(text="t", repeat=3), timeout=CALL_TIMEOUT)] == [0, 1, 2]
    finally:
        ch.close()


# ---- flow control ---------------------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.timeout(180)
def test_slow_client_slows_the_function_and_memory_stays_bounded(apusd, stub):
    """200 responses of 1 MiB to a client that reads one every 20 ms: the gateway holds at most the flow-control
    windows, not the stream (200 MiB), so its resident memory grows by far less than what passes through."""
    before = _rss_kib(apusd.proc.pid)
    peak = before
    count = 0
    for message in stub.Expand(req(text="flood", repeat=200, response_bytes=1 << 20), timeout=150):
        assert len(message.payload) == 1 << 20
        count += 1
        if count % 10 == 0:
            peak = max(peak, _rss_kib(apusd.proc.pid))
        time.sleep(0.02)
    assert count == 200
    growth_mib = (peak - before) / 1024
    assert growth_mib < 64, f"apusd grew by {growth_mib:.0f} MiB while 200 MiB streamed to a slow client"


@pytest.mark.timeout(120)
def test_client_that_gives_no_window_back_holds_the_function(apusd, stub):
    """A raw client that reads but gives no flow-control window back: the gateway holds at most its windows for
    the call (the function is held back, not buffered in the gateway), and the stream completes once the client
    gives the window back."""
    assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"
    client = H2Client(apusd.http_port, auto_ack=False, initial_window=65_535, connection_window=1 << 30)
    try:
        before = _rss_kib(apusd.proc.pid)
        call = client.grpc_call("/echo.Echo/Expand", req(text="held", repeat=64, response_bytes=1 << 20).SerializeToString())
        client.pump(3.0)
        received = len(client.streams[call].body)
        assert received <= 65_535, f"{received} bytes arrived past the client's 64 KiB stream window"
        growth_mib = (_rss_kib(apusd.proc.pid) - before) / 1024
        assert growth_mib < 24, f"apusd grew by {growth_mib:.0f} MiB while the client gave no window back (64 MiB to send)"
        assert not client.streams[call].ended
        client.auto_ack = True
        client.acknowledge()
        client.wait(call)
        assert client.streams[call].grpc_status == "0", (client.streams[call].headers, client.streams[call].trailers)
        assert len(grpc_messages(bytes(client.streams[call].body))) == 64
    finally:
        client.close()


# ---- shutdown -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_lets_an_in_flight_grpc_call_finish(fresh_apusd):
    """On SIGTERM the gateway sends GOAWAY on HTTP/2 connections but lets open streams complete."""
    fresh_apusd.deploy(ECHO_DIR)
    ch = insecure_channel(fresh_apusd)
    try:
        stub = echo_stub(ch)
        assert stub.Get(req(text="warm"), timeout=CALL_TIMEOUT).text == "warm"
        call = stub.Get.future(req(text="in flight", sleep_ms=1500), timeout=60)
        time.sleep(0.4)
        fresh_apusd.signal()
        assert call.result().text == "in flight"
    finally:
        ch.close()
    assert fresh_apusd.wait(timeout=30) == 0


# ---- reflection ------------------------------------------------------------------------------------------------


def _fields(message: bytes) -> list:
    """Top-level (field number, value) pairs of a protobuf message: bytes for length-delimited fields, ints for
    varints (enough for the reflection responses)."""
    out, i = [], 0

    def varint():
        nonlocal i
        value, shift = 0, 0
        while True:
            b = message[i]
            i += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    while i < len(message):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            length = varint()
            out.append((number, message[i:i + length]))
            i += length
        else:
            raise AssertionError(f"unexpected wire type {wire} in {message!r}")
    return out


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services(channel, echo_fn, version):
    info = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    list_services = bytes([0x3A, 0x00])  # ServerReflectionRequest{list_services: ""}
    by_symbol = bytes([0x22, 0x09]) + b"echo.Echo"  # {file_containing_symbol: "echo.Echo"}
    responses = list(info(iter([list_services, by_symbol]), timeout=CALL_TIMEOUT))
    assert len(responses) == 2, responses

    listed = dict(_fields(responses[0]))
    assert listed[2] == list_services, "original_request is echoed"
    names = {dict(_fields(service))[1].decode() for number, service in _fields(listed[6]) if number == 1}
    assert {ECHO_SERVICE, "grpc.health.v1.Health", f"grpc.reflection.{version}.ServerReflection"} <= names, names

    error = dict(_fields(dict(_fields(responses[1]))[7]))
    assert error[1] == 5 and b"descriptor" in error[2], error
