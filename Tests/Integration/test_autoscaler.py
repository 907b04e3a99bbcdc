"""The autoscaler against a real apusd: after a burst it keeps capacity through its stable window (where idleness
alone would stop instances), logs each decision with its inputs, and lets the function go to zero once the window
has emptied and the grace has passed. The decision logic itself (windows, panic, step bounds, schedules) is unit
tested with a test clock in Tests/ApusSchedulerTests/KPAScalerTests.swift.
"""

from __future__ import annotations

import threading
import time

import pytest

from apus_testlib import FUNCTIONS_DIR, Apusd

GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")


def live_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if not any(s in str(i.get("state", "")).lower() for s in GONE_STATES)]


@pytest.mark.timeout(120)
def test_burst_capacity_is_kept_through_the_window_then_released(tmp_path):
    # Idle instances would stop after 1 s; the autoscaler's 10 s window and 4 s grace say otherwise.
    daemon = Apusd(tmp_path / "apusd", extra_args=(
        "--idle-timeout", "1s", "--autoscale-window", "10s", "--scale-to-zero-grace", "4s"))
    try:
        daemon.start()
        daemon.deploy(FUNCTIONS_DIR / "counter")  # concurrency 2, scale max 3
        results = []

        def call():
            results.append(daemon.get("/counter/?sleep=1.5", timeout=30).status)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 6, results
        burst_over = time.monotonic()

        # Three times the idle timeout later, the burst's instances are still there.
        time.sleep(3)
        kept = live_instances(daemon, "counter")
        assert len(kept) >= 2, f"the autoscaler kept {len(kept)} instance(s) 3 s after the burst: {kept}"

        log = daemon.log_tail(400)
        decisions = [line for line in log.splitlines() if "autoscaler decision" in line and "function=counter" in line]
        assert decisions, f"no autoscaler decision was logged:\n{log}"
        assert all(key in decisions[0] for key in ("desired=", "ready=", "stableConcurrency=", "inFlight=")), decisions[0]

        # Once the window has emptied (10 s) and the grace passed (4 s), the function goes to zero.
        deadline = burst_over + 60
        while live_instances(daemon, "counter"):
            assert time.monotonic() < deadline, "instances were never released after the window and the grace"
            time.sleep(0.5)
        assert time.monotonic() - burst_over >= 10, "released before the stable window emptied"
    finally:
        daemon.teardown()
