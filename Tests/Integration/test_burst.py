"""Bursts against real instances: 200 concurrent requests at a function scaled to zero (held while instances
start, released to them as they become ready, none lost), and a 10x step in load raising the ready instances to
what the new load needs. Timing is never asserted beyond generous bounds; the scaler's reaction time is measured by
Scripts/bench-coldstart.
"""

from __future__ import annotations

import threading
import time

import pytest

from apus_testlib import FUNCTIONS_DIR, Response, call_together, copy_function


def ready_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if i["state"] == "ready"]


def wait_until_scaled_to_zero(apusd, name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not apusd.api_json("GET", f"/v1/functions/{name}/instances")["instances"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} still has instances after {timeout}s")


@pytest.mark.timeout(150)
def test_burst_of_200_at_a_function_scaled_to_zero_all_succeed(apusd, tmp_path):
    # counter: concurrency 10, up to 10 instances; every request sleeps 0.3 s.
    func = copy_function(FUNCTIONS_DIR / "counter", tmp_path / "burst", name="burst",
                         subs=[(r"^concurrency: .*$", "concurrency: 10"), (r"^  max: .*$", "  max: 10")])
    apusd.deploy(func)
    wait_until_scaled_to_zero(apusd, "burst")

    n = 200
    results = call_together(n, lambda _: apusd.get("/burst/?sleep=0.3", timeout=60), timeout=90)

    failed = [r for r in results if not (isinstance(r, Response) and r.status == 200)]
    assert not failed, f"{len(failed)} of {n} requests failed, e.g. {failed[:3]!r}"
    used = {r.json()["instance"] for r in results}
    assert 2 <= len(used) <= 10, f"{len(used)} instances served the burst (scale.max is 10): {sorted(used)}"
    assert all(r.json()["inFlightNow"] <= 10 for r in results)


@pytest.mark.timeout(150)
def test_a_10x_step_in_load_raises_ready_instances_to_the_need(apusd, tmp_path):
    # concurrency 1: one instance per client request in flight; the step goes from 1 client to 10.
    func = copy_function(FUNCTIONS_DIR / "counter", tmp_path / "step", name="step",
                         subs=[(r"^concurrency: .*$", "concurrency: 1"), (r"^  max: .*$", "  max: 20")])
    apusd.deploy(func)
    stop = threading.Event()
    outcomes: list = []
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            try:
                r = apusd.get("/step/?sleep=0.2", timeout=30)
                with lock:
                    outcomes.append(r.status)
            except Exception as exc:  # counted as a failure below
                with lock:
                    outcomes.append(repr(exc))

    clients = [threading.Thread(target=client, daemon=True)]
    clients[0].start()
    try:
        time.sleep(3)
        steady = len(ready_instances(apusd, "step"))
        assert 1 <= steady <= 2, f"one client at a time kept {steady} instances ready"
        for _ in range(9):
            clients.append(threading.Thread(target=client, daemon=True))
            clients[-1].start()
        stepped_at = time.monotonic()
        reached = None
        while time.monotonic() - stepped_at < 30:
            if len(ready_instances(apusd, "step")) >= 10:
                reached = time.monotonic() - stepped_at
                break
            time.sleep(0.05)
        assert reached is not None, (
            f"ready instances never reached 10 after the step: {len(ready_instances(apusd, 'step'))}")
        # The autoscaler follows within its stable window (2 s here): it then asks for at least the 10 in flight,
        # so the capacity the pool started for the queued requests is kept.
        desired = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and desired < 10:
            decisions = apusd.api_json("GET", "/v1/functions/step/instances")["autoscaler"]
            desired = max((d["desired"] for d in decisions), default=0)
            time.sleep(0.2)
        assert desired >= 10, f"the autoscaler asked for {desired} instances under a load of 10 in flight"
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    failed = [o for o in outcomes if o != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed across the step: {failed[:3]}"
