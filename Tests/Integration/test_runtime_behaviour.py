"""Python runtime response shapes, rlimits, scale.min, idle scale-down, shedding and start failures."""

import base64
import os
import subprocess
import threading
import time

import pytest

from apus_testlib import APUS, FUNCTIONS_DIR, Apusd, assert_error, copy_function


@pytest.mark.parametrize("path, status, content_type, body", [
    ("/str", 200, "text/plain", b"plain text"),
    ("/bytes", 200, "application/octet-stream", b"\x00\x01\xff"),
    ("/dict", 200, "application/json", b'{"a": 1}'),
    ("/list", 200, "application/json", b"[1, 2, 3]"),
    ("/none", 204, None, b""),
    ("/response", 201, "text/csv", b"a,b\n"),
    ("/b64", 200, "application/octet-stream", b"\xde\xad\xbe\xef"),
])
def test_python_return_shapes(apusd, deployed, path, status, content_type, body):
    deployed.fixture("shapes")
    r = apusd.get(f"/shapes{path}")
    assert r.status == status, r
    if content_type:
        assert (r.header("Content-Type") or "").startswith(content_type), r.header("Content-Type")
    assert r.body.replace(b" ", b"") == body.replace(b" ", b""), r
    if path == "/response":
        assert r.header("X-Custom") == "yes"


def test_python_event_carries_text_and_binary_bodies(apusd, deployed):
    deployed.fixture("shapes")
    r = apusd.gw("POST", "/shapes/echo?x=1&y=two", body=b"hello", headers={"Content-Type": "text/plain"})
    doc = r.json()
    assert doc == {"method": "POST", "path": "/echo", "query": {"x": "1", "y": "two"}, "body": "hello",
                   "isBase64Encoded": False, "contentType": "text/plain"}, doc
    raw = bytes(range(256))
    doc = apusd.gw("PUT", "/shapes/echo", body=raw).json()
    assert doc["isBase64Encoded"] is True and base64.b64decode(doc["body"]) == raw, doc


def test_python_exception_is_500_and_logged(apusd, deployed):
    deployed.fixture("shapes")
    r = apusd.get("/shapes/raise")
    assert_error(r, 500, "function_error")
    assert "boom on purpose" in r.json()["error"]["message"]
    request_id = r.header("X-Apus-Request-Id")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logs = apusd.cli_ok("logs", "shapes", "--tail", "200")
        if "boom on purpose" in logs and request_id in logs:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"traceback for {request_id} not in the logs:\n{logs}")
    assert "stderr|" in logs and "ValueError" in logs


def test_rlimits_apply(apusd, deployed):
    deployed.fixture("shapes")
    limits = apusd.get("/shapes/limits").json()
    assert limits["Max open files"] == "1024", limits
    if apusd.info.get("sandboxLayers", {}).get("cgroups"):
        # Memory is the cgroup's (resident memory); address space is not limited. Past the 128Mi the OOM killer
        # ends the instance and the caller is told so (tests/test_sandbox.py has the rest).
        assert limits["Max address space"] == "unlimited", limits
        r = apusd.get("/shapes/alloc?mb=400")
        assert r.status == 502 and "out of memory (limit 128Mi)" in r.text, r
    else:
        assert limits["Max address space"] == str(128 * 1024 * 1024), limits
        # Allocating past the 128Mi limit fails inside the function (MemoryError → 500), and the gateway stays up.
        r = apusd.get("/shapes/alloc?mb=400")
        assert_error(r, 500, "function_error")
        assert "MemoryError" in r.json()["error"]["message"]
    assert apusd.get("/shapes/alloc?mb=8").json() == {"allocated": 8 * 1024 * 1024}


def test_scale_min_keeps_an_instance_warm(apusd, deployed):
    deployed.fixture("warm")
    deadline = time.monotonic() + 20
    ready = []
    while time.monotonic() < deadline:
        ready = [i for i in apusd.api_json("GET", "/v1/functions/warm/instances")["instances"] if i["state"] == "ready"]
        if ready:
            break
        time.sleep(0.2)
    assert len(ready) == 1, "scale.min 1 should start an instance before any request"
    first = ready[0]["id"]
    assert apusd.get("/warm/").json()["instance"] == first
    # The session daemon runs with a short idle timeout; the warm instance outlives it.
    time.sleep(5)
    ids = [i["id"] for i in apusd.api_json("GET", "/v1/functions/warm/instances")["instances"]]
    assert first in ids, ids


def test_idle_instances_scale_to_zero(apusd, deployed, tmp_path):
    name = deployed(copy_function(FUNCTIONS_DIR / "envdump", tmp_path / "idler", name="idler"))
    assert apusd.get(f"/{name}/").status == 200
    assert apusd.api_json("GET", f"/v1/functions/{name}/instances")["instances"], "no instance after a call"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not apusd.api_json("GET", f"/v1/functions/{name}/instances")["instances"]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the idle instance (scale.min 0) was never stopped")
    # and the next request starts one again
    assert apusd.get(f"/{name}/").status == 200


def test_instance_that_cannot_start_gives_503(apusd, deployed):
    deployed.fixture("broken")
    r = apusd.get("/broken/", timeout=30)
    assert_error(r, 503, "unavailable")
    assert "module_that_does_not_exist" in r.json()["error"]["message"] or "before it was ready" in r.json()["error"]["message"]
    assert r.header("Retry-After")
    logs = apusd.cli_ok("logs", "broken")
    assert "ModuleNotFoundError" in logs or "module_that_does_not_exist" in logs, logs


@pytest.mark.timeout(120)
def test_full_queue_sheds_with_429(tmp_path):
    """One slot (concurrency 1, max 1) and a queue of 2: of 8 simultaneous slow calls, 3 are served and the rest
    are refused at once with 429 and Retry-After — nothing hangs."""
    daemon = Apusd(tmp_path / "apusd", extra_args=("--queue-length", "2"))
    try:
        daemon.start()
        fn = copy_function(FUNCTIONS_DIR / "counter", tmp_path / "single", name="single",
                           subs=[(r"^concurrency:.*$", "concurrency: 1"), (r"^  max: 3$", "  max: 1")])
        daemon.deploy(fn)
        assert daemon.get("/single/?sleep=0").status == 200  # instance up
        results = [None] * 8
        barrier = threading.Barrier(8)

        def call(i):
            barrier.wait(10)
            results[i] = daemon.get("/single/?sleep=1.0", timeout=60)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        statuses = sorted(r.status for r in results)
        assert statuses.count(200) == 3, statuses
        assert statuses.count(429) == 5, statuses
        for r in results:
            if r.status == 429:
                assert_error(r, 429, "overloaded")
                assert r.header("Retry-After") == "1"
    finally:
        daemon.teardown()


def test_logs_follow_streams_new_lines(apusd, deployed):
    deployed.example("hello-python")
    proc = subprocess.Popen([str(APUS), "--api", apusd.api, "logs", "hello-python", "--follow", "--tail", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "APUS_TOKEN": apusd.admin_token})
    try:
        time.sleep(0.5)
        marker = f"follow-{time.monotonic_ns()}"
        assert apusd.get(f"/hello-python/?name={marker}").status == 200
        seen = []
        found = threading.Event()

        def reader():
            for line in proc.stdout:
                seen.append(line)
                if marker in line:
                    found.set()
                    return

        threading.Thread(target=reader, daemon=True).start()
        assert found.wait(15), f"`apus logs --follow` did not show the new line; got {seen!r}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_without_sandbox_rlimits_still_apply_and_it_is_said_loudly(tmp_path):
    daemon = Apusd(tmp_path / "apusd", extra_args=("--no-sandbox",))
    try:
        daemon.start()
        assert daemon.info["sandbox"] == "rlimits", daemon.info
        assert "sandbox disabled" in daemon.log_tail(200), daemon.log_tail(40)
        daemon.deploy(FUNCTIONS_DIR / "shapes")
        limits = daemon.get("/shapes/limits").json()
        assert limits == {"Max address space": str(128 * 1024 * 1024), "Max open files": "1024"}, limits
    finally:
        daemon.teardown()
