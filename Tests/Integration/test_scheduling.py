"""The data plane: per-instance concurrency slots and max scale, deadlines, crashed instances."""

import socket
import time

import pytest

from apus_testlib import Response, assert_error, call_together, wait_for_log

GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")


def live_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if not any(s in str(i.get("state", "")).lower() for s in GONE_STATES)]



@pytest.mark.timeout(120)
def test_concurrency_slots_and_max_scale(apusd, deployed):
    """100 concurrent requests to counter (concurrency 2, scale max 3): all succeed, no instance ever runs more
    than 2 at once, and at most 3 instances are used."""
    deployed.fixture("counter")
    n = 100
    start = time.monotonic()
    results = call_together(n, lambda _: apusd.get("/counter/?sleep=0.2", timeout=90))
    elapsed = time.monotonic() - start

    failed = [r for r in results if not (isinstance(r, Response) and r.status == 200)]
    assert not failed, f"{len(failed)} of {n} requests failed, e.g. {failed[:3]!r}"

    max_in_flight: dict[str, int] = {}
    for r in results:
        doc = r.json()
        assert doc["inFlightNow"] <= 2, doc
        max_in_flight[doc["instance"]] = max(max_in_flight.get(doc["instance"], 0), doc["maxInFlight"])
    assert 1 <= len(max_in_flight) <= 3, f"{len(max_in_flight)} instances used (scale.max is 3): {max_in_flight}"
    assert all(v <= 2 for v in max_in_flight.values()), f"concurrency 2 exceeded: {max_in_flight}"
    assert max(max_in_flight.values()) == 2, f"no instance ever served 2 requests at once: {max_in_flight}"
    # 100 x 0.2 s over at most 6 slots is >= 3.3 s; a single slot in total would take >= 20 s.
    assert elapsed < 20, f"100 requests took {elapsed:.1f}s: requests were not spread over slots/instances"

    # The control API sees the same instances, none above its concurrency.
    instances = live_instances(apusd, "counter")
    assert len(instances) <= 3, instances
    for inst in instances:
        assert inst["version"] == 1 and 0 <= inst["inFlight"] <= 2, inst
    assert set(max_in_flight) <= {i["id"] for i in apusd.api_json(
        "GET", "/v1/functions/counter/instances")["instances"]}, "instance ids differ between APUS_INSTANCE and the API"

    r = apusd.get("/counter/max")
    assert r.status == 200, r
    assert r.json()["maxInFlight"] <= 2


def test_deadline_exceeded(apusd, deployed):
    """sleeper has `timeout: 1s`; a 3 s request is cut off with 504 deadline_exceeded."""
    deployed.fixture("sleeper")
    warm = apusd.get("/sleeper/?sleep=0")
    assert warm.status == 200, warm

    start = time.monotonic()
    r = apusd.get("/sleeper/?sleep=3", timeout=30)
    elapsed = time.monotonic() - start
    assert_error(r, 504, "deadline_exceeded")
    # Answered at the 1 s deadline, not after the function's own 3 s (no tighter bound: tests never judge speed).
    assert 0.9 <= elapsed < 3.0, f"deadline of 1s answered after {elapsed:.2f}s"


def test_instance_that_stops_listening_is_replaced_without_failing_a_request(apusd, deployed):
    """A connect refused by a ready instance (dead but its exit not seen yet) takes it out of service and the
    request goes to a fresh instance: nothing was sent, so the retry is safe for any method."""
    deployed.fixture("deafener")
    r1 = apusd.get("/deafener/deafen")
    assert r1.status == 200 and r1.json()["deafened"] is True, r1
    pid1 = r1.json()["pid"]
    listed = live_instances(apusd, "deafener")
    before = {i["id"] for i in listed}
    port = listed[0]["port"]
    address = listed[0].get("address") or "127.0.0.1"  # its own network namespace's address, where it has one
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the instance has closed its listening socket
        try:
            socket.create_connection((address, port), timeout=1).close()
        except ConnectionRefusedError:
            break
        except ConnectionResetError:
            pass  # the listening socket is being closed right now
        time.sleep(0.1)
    else:
        raise AssertionError("the instance kept listening after /deafen")

    r2 = apusd.gw("POST", "/deafener/after", body=b"payload")
    assert r2.status == 200, r2
    assert r2.json()["deafened"] is False
    if apusd.info.get("sandbox") != "bwrap":
        assert r2.json()["pid"] != pid1
    after = {i["id"] for i in live_instances(apusd, "deafener")}
    assert after and before.isdisjoint(after), f"the deaf instance is still listed: before {before}, after {after}"
    assert any("instance unreachable" in line and "function=deafener" in line
               for line in apusd.log_tail(400).splitlines()), "the refused connect was not logged"


def test_crash_gives_502_and_instance_is_replaced(apusd, deployed):
    deployed.fixture("crasher")
    r1 = apusd.get("/crasher/")
    assert r1.status == 200 and r1.json()["ok"] is True, r1
    pid1 = r1.json()["pid"]
    before = {i["id"] for i in live_instances(apusd, "crasher")}
    assert before, "no crasher instance is listed while it serves"

    r = apusd.get("/crasher/crash")
    assert_error(r, 502, "instance_error")

    r2 = apusd.get("/crasher/")
    assert r2.status == 200 and r2.json()["ok"] is True, r2
    # The dead instance leaves the list (its exit may be noticed a moment after the 502).
    deadline = time.monotonic() + 5
    after = {i["id"] for i in live_instances(apusd, "crasher")}
    while not before.isdisjoint(after) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = {i["id"] for i in live_instances(apusd, "crasher")}
    assert after, "no crasher instance after the replacement served a request"
    assert before.isdisjoint(after), f"the crashed instance is still listed: before {before}, after {after}"
    if apusd.info.get("sandbox") != "bwrap":  # in a pid namespace the pids may repeat
        assert r2.json()["pid"] != pid1

    # What the instance printed before dying is in its logs.
    m = wait_for_log(apusd, "crasher", "crashing on purpose")
    assert m.group("version") == "1"
