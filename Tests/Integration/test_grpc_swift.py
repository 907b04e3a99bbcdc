"""The Swift example (grpc-swift-2, Examples/echo-swift) behind the gateway, called by the python grpcio client.

The binary comes from the test build (APUS_BIN_DIR/apus-example-echo). That debug build links the Swift runtime
from the toolchain, which the instance sandbox does not mount, so this module's apusd runs with --no-sandbox; a
deployable build links it statically (`--static-swift-stdlib`, see Examples/echo-swift/README.md).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from apus_testlib import BIN_DIR, EXAMPLES_DIR, Apusd
from grpc_support import CALL_TIMEOUT, echo_stub, insecure_channel, metadata_dict, req, wait_for_log

SWIFT_BINARY = BIN_DIR / "apus-example-echo"
FUNCTION = "echo-swift"


@pytest.fixture(scope="module")
def swift_apusd(tmp_path_factory):
    if not SWIFT_BINARY.exists():
        pytest.fail(f"{SWIFT_BINARY} is missing: `swift build --build-tests` builds it with the rest")
    work = tmp_path_factory.mktemp("apusd-swift")
    staged = work / "echo-swift"
    staged.mkdir()
    shutil.copy(EXAMPLES_DIR / "echo-swift" / "apus.yaml", staged / "apus.yaml")
    binary = staged / "apus-example-echo"
    shutil.copy(SWIFT_BINARY, binary)
    if shutil.which("strip"):
        subprocess.run(["strip", str(binary)], check=True)  # keeps the upload well under the archive limit
    daemon = Apusd(work / "apusd", extra_args=("--no-sandbox",))
    try:
        daemon.start()
        daemon.deploy(staged)
        yield daemon
    finally:
        daemon.teardown()


@pytest.fixture(scope="module")
def stub(swift_apusd):
    channel = insecure_channel(swift_apusd)
    yield echo_stub(channel)
    channel.close()


@pytest.mark.timeout(120)
def test_four_call_shapes(swift_apusd, stub):
    first = stub.Get(req(text="hello swift"), timeout=CALL_TIMEOUT)
    assert first.text == "hello swift" and first.served_by == "swift", first
    instances = swift_apusd.api_json("GET", f"/v1/functions/{FUNCTION}/instances")["instances"]
    assert first.instance in {i["id"] for i in instances}, (first.instance, instances)

    assert [(m.index, m.text) for m in stub.Expand(req(text="s", repeat=4), timeout=CALL_TIMEOUT)] == \
        [(i, "s") for i in range(4)]
    collected = stub.Collect(iter([req(text=w) for w in ("one", "two", "three")]), timeout=CALL_TIMEOUT)
    assert (collected.text, collected.index) == ("one two three", 3)

    # Bidirectional, message by message: each answer arrives before the next request is sent.
    outbox: list = []
    ready = threading.Event()

    def requests():
        for word in ("a", "b", "c"):
            outbox.append(word)
            yield req(text=word)
            assert ready.wait(CALL_TIMEOUT), "no answer to the previous message"
            ready.clear()

    answers = []
    for answer in stub.Update(requests(), timeout=CALL_TIMEOUT):
        answers.append(answer.text)
        assert answer.text == outbox[-1], (answer.text, outbox)
        ready.set()
    assert answers == ["a", "b", "c"]


def test_metadata_and_status(stub):
    response, call = stub.Get.with_call(req(text="md"), metadata=(("k", "v1"), ("k-bin", b"\x00\xff")),
                                        timeout=CALL_TIMEOUT)
    initial, trailing = metadata_dict(call.initial_metadata()), metadata_dict(call.trailing_metadata())
    for md in (initial, trailing):
        assert md.get("echo-k") == "v1" and md.get("echo-k-bin") == b"\x00\xff", md
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(req(text="x", fail_code=9, fail_message="nicht möglich ✓"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "nicht möglich ✓"


@pytest.mark.timeout(120)
def test_large_messages(stub):
    payload = bytes(range(256)) * (5 * 4096)  # 5 MiB
    r = stub.Get(req(text="big", payload=payload, response_bytes=6 << 20), timeout=60)
    assert len(r.payload) == 6 << 20 and r.payload[:len(payload)] == payload


@pytest.mark.timeout(120)
def test_many_concurrent_calls(stub):
    with ThreadPoolExecutor(max_workers=100) as pool:
        texts = list(pool.map(lambda i: stub.Get(req(text=f"c{i}", sleep_ms=100), timeout=60).text, range(100)))
    assert texts == [f"c{i}" for i in range(100)]


def test_deadline_and_cancel_reach_the_swift_function(swift_apusd, stub):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(req(text="too-slow", sleep_ms=5000), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    wait_for_log(swift_apusd, FUNCTION, "cancelled Get too-slow")

    call = stub.Get.future(req(text="cancel-me", sleep_ms=10000), timeout=60)
    time.sleep(0.5)
    call.cancel()
    wait_for_log(swift_apusd, FUNCTION, "cancelled Get cancel-me")
