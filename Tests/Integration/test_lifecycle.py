"""apusd lifecycle on its own daemon: state survives a restart, SIGTERM drains in-flight requests."""

import threading
import time

import pytest

from apus_testlib import EXAMPLES_DIR, FUNCTIONS_DIR, copy_function

MARKER_V2 = [(r"^(\s*MARKER:\s*['\"]?)v1", r"\g<1>v2")]


def assert_no_leftovers(apusd, timeout=5.0):
    """After apusd exited, none of its instance processes may still run."""
    deadline = time.monotonic() + timeout
    pids = apusd.leftovers()
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = apusd.leftovers()
    details = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            details.append(f"{pid}: {cmdline}")
        except OSError:
            pass
    assert not pids, "processes left running after apusd exited:\n" + "\n".join(details)


def snapshot(apusd):
    return {
        "list": apusd.api_json("GET", "/v1/functions"),
        "versioned": apusd.api_json("GET", "/v1/functions/versioned"),
        "versions": apusd.api_json("GET", "/v1/functions/versioned/versions"),
        "hello": apusd.api_json("GET", "/v1/functions/hello-python"),
        "cli_list": apusd.cli_json("list"),
        "cli_versions": apusd.cli_json("versions", "versioned"),
    }


@pytest.mark.timeout(150)
def test_state_survives_restart(fresh_apusd, tmp_path):
    d = fresh_apusd
    v1 = copy_function(FUNCTIONS_DIR / "versioned", tmp_path / "v1")
    v2 = copy_function(FUNCTIONS_DIR / "versioned", tmp_path / "v2", subs=MARKER_V2)
    d.deploy(v1)
    d.deploy(v2, release=False)
    d.cli_ok("release", "versioned", "1=70", "2=30")
    d.deploy(EXAMPLES_DIR / "hello-python")

    # Instances are running when the daemon stops.
    assert d.get("/versioned/").status == 200
    assert d.get("/hello-python/").status == 200
    before = snapshot(d)

    start = time.monotonic()
    rc = d.stop(timeout=15)
    assert rc == 0, f"apusd exited {rc} after SIGTERM"
    assert time.monotonic() - start < 15
    assert_no_leftovers(d)

    d.start()  # same data dir; new ephemeral ports come from the new ports.json
    after = snapshot(d)
    assert after["list"] == before["list"]
    assert after["versioned"] == before["versioned"]
    assert after["versions"] == before["versions"]
    assert after["hello"] == before["hello"]
    assert after["cli_list"] == before["cli_list"]
    assert after["cli_versions"] == before["cli_versions"]
    assert {w["version"]: w["weight"] for w in after["versioned"]["release"]["weights"]} == {1: 70, 2: 30}

    seen = set()
    for _ in range(30):
        r = d.get("/versioned/")
        assert r.status == 200, r
        doc = r.json()
        assert doc["marker"] == "v" + doc["version"]
        seen.add(doc["version"])
    assert seen <= {"1", "2"} and "1" in seen
    r = d.get("/versioned/", headers={"X-Apus-Version": "2"})
    assert r.status == 200 and r.json() == {"version": "2", "marker": "v2"}, r
    r = d.get("/hello-python/?name=Again")
    assert r.status == 200 and r.json()["message"] == "Hello, Again!", r


@pytest.mark.timeout(90)
def test_sigterm_drains_in_flight_request(fresh_apusd):
    d = fresh_apusd
    d.deploy(FUNCTIONS_DIR / "counter")
    warm = d.get("/counter/?sleep=0")
    assert warm.status == 200, warm

    result = {}

    def slow_call():
        try:
            result["response"] = d.get("/counter/?sleep=1.5", timeout=30)
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=slow_call, daemon=True)
    start = time.monotonic()
    t.start()
    time.sleep(0.3)
    d.signal()  # SIGTERM
    t.join(30)
    assert not t.is_alive(), "the in-flight request never finished"
    assert "error" not in result, f"in-flight request failed during drain: {result['error']!r}"
    r = result["response"]
    assert r.status == 200, r
    assert r.json()["inFlightNow"] == 1
    assert time.monotonic() - start >= 1.4

    rc = d.wait(timeout=15)
    assert rc == 0, f"apusd exited {rc} after SIGTERM"
    assert_no_leftovers(d)


@pytest.mark.timeout(120)
def test_sigterm_with_registry_watches_open_exits_cleanly(fresh_apusd):
    """Registry long-polls held by several clients (as sidecars hold them) while apusd stops: every watch is
    answered or closed, apusd drains and exits 0 (finishing the watches used to take the registry's lock twice and
    crash apusd with 'Recursive call to lock Mutex', leaving instances undrained)."""
    from registry_support import long_poll, register, resolve

    d = fresh_apusd
    d.deploy(FUNCTIONS_DIR / "counter")
    assert d.get("/counter/?sleep=0").status == 200
    register(d, "stop.watch", "e1", port=7400, ttl=60)
    index = resolve(d, "stop.watch")["index"]

    results: dict[int, object] = {}

    def watch(i: int):
        try:
            # Watches of the watched service and of one nobody registered, each waiting long past the stop.
            service = "stop.watch" if i % 2 == 0 else f"stop.none{i}"
            snapshot_index = index if i % 2 == 0 else resolve(d, service)["index"]
            results[i] = long_poll(d, service, snapshot_index, wait="5m", timeout=60)
        except Exception as exc:  # a connection closed by the stopping daemon is an acceptable answer
            results[i] = exc

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # every watch is waiting inside apusd
    assert not results, f"watches answered before anything changed: {results}"
    d.signal()  # SIGTERM
    rc = d.wait(timeout=30)
    log = d.log_tail(200)
    assert "Recursive call to lock" not in log and "Fatal error" not in log, log
    assert rc == 0, f"apusd exited {rc} after SIGTERM with registry watches open:\n{log}"
    for t in threads:
        t.join(10)
    assert len(results) == len(threads) and not any(t.is_alive() for t in threads), results
    assert_no_leftovers(d)
