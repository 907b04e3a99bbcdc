"""Sharding (`apusd --shard-size K`): with more than K ready instances of a version, each gateway event loop sends
its requests to the K instances the consistent-hash ring gives it, and spills to the others only when all of those
are busy. With `--gateway-threads 1` every request comes through the same loop, hence the same shard.

The function is `counter` with 3 slots per instance, kept at 6 ready instances with `apus scale --min 6 --max 6`:
6 simultaneous requests fit in a 2-instance shard (3 each), whereas least-outstanding over all 6 instances spreads
them one per instance.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from apus_testlib import APUSD, FUNCTIONS_DIR, Apusd, copy_function

GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")
INSTANCES = 6
SLOTS = 3


def ready_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if i["state"] == "ready"]


def start_with_six_instances(workdir, extra_args):
    daemon = Apusd(workdir / "apusd", extra_args=("--gateway-threads", "1", *extra_args))
    daemon.start()
    fn = copy_function(FUNCTIONS_DIR / "counter", workdir / "spread", name="spread",
                       subs=[(r"^concurrency:.*$", f"concurrency: {SLOTS}"), (r"^timeout:.*$|^scale:", "timeout: 20s\nscale:")])
    daemon.deploy(fn)
    daemon.cli_ok("scale", "spread", "--min", str(INSTANCES), "--max", str(INSTANCES))
    deadline = time.monotonic() + 30
    while len(ready_instances(daemon, "spread")) < INSTANCES:
        assert time.monotonic() < deadline, f"never got {INSTANCES} ready instances: {ready_instances(daemon, 'spread')}"
        time.sleep(0.2)
    return daemon


def simultaneous(apusd, count, sleep):
    """`count` requests at once (a barrier, one connection each); returns the instance of each, all 200."""
    results = [None] * count
    barrier = threading.Barrier(count)

    def call(i):
        barrier.wait(10)
        results[i] = apusd.get(f"/spread/?sleep={sleep}", timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    bad = [r for r in results if r is None or r.status != 200]
    assert not bad, f"{len(bad)} of {count} requests failed: {bad[:3]}"
    return [r.json() for r in results]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    daemon = None
    try:
        daemon = start_with_six_instances(tmp_path_factory.mktemp("sharded"), ("--shard-size", "2"))
        yield daemon
    finally:
        if daemon is not None:
            daemon.teardown()


@pytest.mark.timeout(60)
def test_sequential_requests_stay_in_the_shard(sharded):
    used = {sharded.get("/spread/?sleep=0").json()["instance"] for _ in range(12)}
    assert 1 <= len(used) <= 2, f"12 sequential requests with --shard-size 2 went to {len(used)} instances: {used}"
    assert used <= {i["id"] for i in ready_instances(sharded, "spread")}


@pytest.mark.timeout(60)
def test_simultaneous_requests_fill_the_shard_before_spilling(sharded):
    """6 at once fit in the shard's 2 x 3 slots: exactly 2 instances, 3 each; the same 2 again next time, and the
    same ones sequential requests use."""
    first = simultaneous(sharded, 2 * SLOTS, sleep=1)
    shard = {doc["instance"] for doc in first}
    assert len(shard) == 2, f"{2 * SLOTS} simultaneous requests with --shard-size 2 used {len(shard)} instances: {shard}"
    assert max(doc["inFlightNow"] for doc in first) == SLOTS, first
    again = {doc["instance"] for doc in simultaneous(sharded, 2 * SLOTS, sleep=1)}
    assert again == shard, f"the shard moved although membership did not: {shard} then {again}"
    sequential = {sharded.get("/spread/?sleep=0").json()["instance"] for _ in range(4)}
    assert sequential <= shard, (sequential, shard)
    assert len(ready_instances(sharded, "spread")) == INSTANCES


@pytest.mark.timeout(60)
def test_requests_beyond_the_shard_spill_to_the_other_instances(sharded):
    """12 at once: the shard's 6 slots are taken, the other 6 requests go to the other instances at once (no
    request waits for the shard, none fails)."""
    docs = simultaneous(sharded, 4 * SLOTS, sleep=1.5)
    used = {doc["instance"] for doc in docs}
    assert len(used) > 2, f"nothing spilled beyond the shard: {used}"
    assert len(used) <= INSTANCES and used <= {i["id"] for i in ready_instances(sharded, "spread")}
    assert all(doc["inFlightNow"] <= SLOTS for doc in docs), docs
    # The shard's 2 instances were full (3 at once each) in this burst; the others took the rest.
    peak = {}
    for doc in docs:
        peak[doc["instance"]] = max(peak.get(doc["instance"], 0), doc["inFlightNow"])
    assert sorted(peak.values())[-2:] == [SLOTS, SLOTS], peak


@pytest.mark.timeout(60)
def test_without_sharding_simultaneous_requests_spread_over_all_instances(tmp_path):
    """The contrast: least outstanding over all 6 instances puts 6 simultaneous requests one per instance."""
    daemon = start_with_six_instances(tmp_path, ())
    try:
        used = [doc["instance"] for doc in simultaneous(daemon, INSTANCES, sleep=1)]
        assert len(set(used)) == INSTANCES, f"without --shard-size 6 requests went to {sorted(used)}"
    finally:
        daemon.teardown()


@pytest.mark.parametrize("args, message", [
    (["--shard-size=-1"], "--shard-size: must be 0...1000 (got -1)"),
    (["--shard-size", "-1"], "--shard-size: must be 0...1000 (got -1)"),
    (["--shard-size", "1001"], "--shard-size: must be 0...1000 (got 1001)"),
    (["--shard-size", "two"], "'two' is invalid for '--shard-size"),
])
def test_bad_shard_size_is_refused_at_startup(tmp_path, args, message):
    p = subprocess.run([str(APUSD), "--data-dir", str(tmp_path / "data"), "--api-port", "0", "--http-port", "0", *args],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, f"apusd {' '.join(args)} started:\n{p.stdout}\n{p.stderr}"
    assert message in p.stderr, p.stderr
    assert not (tmp_path / "data" / "ports.json").exists()
