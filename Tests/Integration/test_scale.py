"""`apus scale NAME --min N --max M` / `--reset` and the API behind it (`PUT` / `DELETE /v1/functions/NAME/scale`):
an override of every released version's `scale.min`/`scale.max`, applied to the pools at once, persisted in the store
across restarts, and shown by `apus status`.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from apus_testlib import FUNCTIONS_DIR, Apusd, assert_error, copy_function

GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")


def live_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if not any(s in str(i.get("state", "")).lower() for s in GONE_STATES)]


def wait_for_instances(apusd, name, count, state=None, timeout=20.0):
    """Until the function has exactly `count` live instances (all in `state` if given)."""
    deadline = time.monotonic() + timeout
    while True:
        live = live_instances(apusd, name)
        if len(live) == count and (state is None or all(i["state"] == state for i in live)):
            return live
        assert time.monotonic() < deadline, f"{name}: expected {count} {state or 'live'} instance(s), got {live}"
        time.sleep(0.2)


def put_scale(apusd, name, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return apusd.api_call("PUT", f"/v1/functions/{name}/scale", body=raw, headers={"Content-Type": "application/json"})


def override_of(doc):
    """The override as (min, max), None when there is none (the key may be absent or null)."""
    o = doc.get("override")
    return None if o is None else (o.get("min"), o.get("max"))


def versions_of(doc):
    return [(v["version"], v["min"], v["max"]) for v in doc["versions"]]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scale-functions")


def elastic(apusd, scratch, name, scale="scale: {min: 0, max: 3}", extra=()):
    """Deploy a copy of the `warm` function (it answers with its instance id) with the given scale line."""
    fn = copy_function(FUNCTIONS_DIR / "warm", scratch / name, name=name, subs=[(r"^scale:.*$", scale), *extra])
    apusd.deploy(fn)
    return name


# ---- pools follow the override ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_min_starts_instances_at_once_and_reset_lets_them_go(apusd, scratch):
    name = elastic(apusd, scratch, "elastic")
    assert live_instances(apusd, name) == [], "scale.min 0 and no request: nothing should run"

    out = apusd.cli_ok("scale", name, "--min", "2")
    assert out.strip() == f"scale {name}: v1 min 2 max 3 (override: min 2)", out
    wait_for_instances(apusd, name, 2, state="ready")
    status = apusd.cli_ok("status", name)
    assert f"scale {name}: v1 min 2 max 3 (override: min 2)" in status.splitlines(), status
    listing = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    assert override_of(listing["scale"]) == (2, None) and versions_of(listing["scale"]) == [(1, 2, 3)], listing["scale"]

    # Longer than the idle timeout (3 s) without a request: the minimum keeps them.
    time.sleep(4)
    assert len(live_instances(apusd, name)) == 2

    out = apusd.cli_ok("scale", name, "--reset")
    assert out.strip() == f"scale {name}: v1 min 0 max 3 (from the manifests)", out
    assert f"scale {name}: v1 min 0 max 3 (from the manifests)" in apusd.cli_ok("status", name)
    wait_for_instances(apusd, name, 0, timeout=30)
    assert override_of(apusd.api_json("GET", f"/v1/functions/{name}/instances")["scale"]) is None


def test_json_output_and_api_shapes_every_released_version(apusd, scratch):
    """The override applies to each released version on top of its own manifest; PUT replaces the whole override
    (a bound left out is the manifest's again); DELETE removes it."""
    name = "bounds"
    v1 = copy_function(FUNCTIONS_DIR / "warm", scratch / "bounds-v1", name=name, subs=[(r"^scale:.*$", "scale: {min: 0, max: 3}")])
    v2 = copy_function(v1, scratch / "bounds-v2", subs=[(r"^scale:.*$", "scale: {min: 0, max: 5}")])
    apusd.deploy(v1)
    apusd.deploy(v2, release=False)
    doc = apusd.cli_json("scale", name, "--max", "2")
    assert doc["function"] == name and override_of(doc) == (None, 2), doc
    assert versions_of(doc) == [(1, 0, 2)], f"only released versions are listed: {doc}"

    apusd.cli_ok("release", name, "1=50", "2=50")
    doc = apusd.cli_json("scale", name, "--min", "1", "--max", "4")
    assert override_of(doc) == (1, 4) and versions_of(doc) == [(1, 1, 4), (2, 1, 4)], doc

    # Only min: each version keeps its manifest's max.
    r = put_scale(apusd, name, {"min": 1})
    assert r.status == 200, r
    doc = r.json()
    assert doc["function"] == name and override_of(doc) == (1, None), doc
    assert versions_of(doc) == [(1, 1, 3), (2, 1, 5)], doc
    # null is the same as leaving the bound out.
    doc = put_scale(apusd, name, {"min": None, "max": 2}).json()
    assert override_of(doc) == (None, 2) and versions_of(doc) == [(1, 0, 2), (2, 0, 2)], doc
    # GET .../instances shows what PUT answered.
    assert apusd.api_json("GET", f"/v1/functions/{name}/instances")["scale"] == doc

    r = apusd.api_call("DELETE", f"/v1/functions/{name}/scale")
    assert r.status == 200, r
    assert override_of(r.json()) is None and versions_of(r.json()) == [(1, 0, 3), (2, 0, 5)], r.json()
    doc = apusd.cli_json("scale", name, "--reset")  # resetting twice is fine
    assert override_of(doc) is None and versions_of(doc) == [(1, 0, 3), (2, 0, 5)], doc


@pytest.mark.timeout(60)
def test_max_caps_instances_under_a_burst(apusd, scratch):
    """counter allows 3 instances of 2 slots; with --max 1, 6 simultaneous requests queue for one instance."""
    fn = copy_function(FUNCTIONS_DIR / "counter", scratch / "capped", name="capped")
    apusd.deploy(fn)
    apusd.cli_ok("scale", "capped", "--max", "1")
    results = [None] * 6
    barrier = threading.Barrier(6)

    def call(i):
        barrier.wait(10)
        results[i] = apusd.get("/capped/?sleep=0.5", timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, len(live_instances(apusd, "capped")))
        time.sleep(0.05)
    assert all(r is not None and r.status == 200 for r in results), results
    used = {r.json()["instance"] for r in results}
    assert len(used) == 1, f"--max 1 but requests were served by {used}"
    assert max(r.json()["maxInFlight"] for r in results) <= 2
    assert peak <= 1, f"{peak} instances at once under --max 1"


@pytest.mark.timeout(60)
def test_override_survives_a_restart(tmp_path):
    daemon = Apusd(tmp_path / "apusd")
    try:
        daemon.start()
        name = elastic(daemon, tmp_path, "durable")
        daemon.cli_ok("scale", name, "--min", "1", "--max", "2")
        wait_for_instances(daemon, name, 1, state="ready")
        daemon.restart()
        # No request after the restart: the minimum from the store brings the instance back by itself.
        wait_for_instances(daemon, name, 1, state="ready")
        doc = daemon.api_json("GET", f"/v1/functions/{name}/instances")["scale"]
        assert override_of(doc) == (1, 2) and versions_of(doc) == [(1, 1, 2)], doc
        assert f"scale {name}: v1 min 1 max 2 (override: min 1, max 2)" in daemon.cli_ok("status", name)

        daemon.cli_ok("scale", name, "--reset")
        daemon.restart()
        assert override_of(daemon.api_json("GET", f"/v1/functions/{name}/instances")["scale"]) is None
        time.sleep(1)
        assert live_instances(daemon, name) == [], "the cleared override still kept an instance after restart"
    finally:
        daemon.teardown()


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(apusd, scratch):
    return elastic(apusd, scratch, "strict")


@pytest.mark.parametrize("body, message", [
    ({"min": 3, "max": 2}, "is above max"),
    ({"min": 4}, "is above max"),  # the manifest's scale.max is 3
    ({"max": 0}, "scale.max: must be 1...1000"),
    ({"max": 1001}, "scale.max: must be 1...1000"),
    ({"min": -1}, "scale.min: must be 0...1000"),
    ({"mn": 1}, "scale.mn: unknown key"),
    ({"min": "two"}, "scale.min: must be a whole number"),
    ({"min": 1.5}, "scale.min: must be a whole number"),
    ({}, "give min, max or both"),
    ([1, 2], "must be a JSON object"),
    (b"{not json", "must be a JSON object"),
])
def test_api_refuses_bad_bounds_and_keeps_the_override(apusd, strict, body, message):
    name = strict
    assert put_scale(apusd, name, {"max": 2}).status == 200
    error = assert_error(put_scale(apusd, name, body), 400, "bad_request")
    assert message in error["message"], error
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")["scale"]
    assert override_of(doc) == (None, 2), f"a refused PUT changed the override: {doc}"


def test_unknown_function_is_404(apusd):
    assert_error(put_scale(apusd, "no-such-function", {"min": 1}), 404, "not_found")
    assert_error(apusd.api_call("DELETE", "/v1/functions/no-such-function/scale"), 404, "not_found")
    rc, out, err = apusd.cli("scale", "no-such-function", "--min", "1")
    assert rc != 0 and out == "", (rc, out, err)
    assert len(err.strip().splitlines()) == 1 and "no-such-function" in err, err


@pytest.mark.parametrize("args, message", [
    (("--min", "3", "--max", "2"), "is above max"),
    (("--max", "0"), "scale.max: must be 1...1000"),
])
def test_cli_reports_refused_bounds_on_one_line(apusd, strict, args, message):
    name = strict
    rc, out, err = apusd.cli("scale", name, *args)
    assert rc != 0 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("args, message", [
    ((), "give --min, --max or both"),
    (("--reset", "--min", "1"), "--reset cannot be combined"),
    (("--min", "many"), "many"),
])
def test_cli_usage_errors(apusd, strict, args, message):
    name = strict
    before = apusd.api_json("GET", f"/v1/functions/{name}/instances")["scale"]
    rc, out, err = apusd.cli("scale", name, *args)
    assert rc != 0, (rc, out, err)
    assert message in err, err
    assert apusd.api_json("GET", f"/v1/functions/{name}/instances")["scale"] == before
