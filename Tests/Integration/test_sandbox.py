"""The instance sandbox under attack (with bubblewrap, apusd as root): unprivileged uid of its own, no
capabilities, no_new_privs, a seccomp filter, a minimal /etc, and cgroup limits (memory, cpu, pids, /tmp) that
hold while the function keeps serving. Plus what must still work inside it: a JVM at 512Mi and a threaded Python
gRPC server at the default 256Mi.

The attacks live in functions/escapist (one function, ?attack=... selects one); copies of it with other
`memory:` / `cpu:` / `pids:` settings are deployed where a test needs them. Every attack test ends with a normal
call that must answer 200: an attack may kill an instance, never the function.

The sandbox checks skip when GET /v1/info does not report sandbox "bwrap" or when the tests (and so apusd) do not
run as root. The deploy-time refusals of limits above --max-memory / --max-cpu are manifest validation and run
everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse

import pytest

from apus_testlib import FUNCTIONS_DIR, Apusd, call_together, copy_function, wait_for_log

ESCAPIST = FUNCTIONS_DIR / "escapist"
MIB = 1024 * 1024
UNPRIVILEGED_UID_MIN = 100000  # instance uids/gids come from a range apusd owns, starting here

# What each syscall must give inside an instance (functions/escapist/probe_syscalls.py tries each for real, with
# arguments the kernel itself would refuse with another errno than EPERM, so EPERM comes from the filter).
DENIED_SYSCALLS = {
    "mount": "EPERM",
    "umount2": "EPERM",
    "open_by_handle_at": "EPERM",
    "name_to_handle_at": "EPERM",
    "ptrace": "EPERM",
    "kexec_load": "EPERM",
    "init_module": "EPERM",
    "finit_module": "EPERM",
    "delete_module": "EPERM",
    "bpf": "EPERM",
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "request_key": "EPERM",
    "unshare(CLONE_NEWUSER)": "EPERM",
    "unshare(CLONE_NEWNS)": "EPERM",
    "unshare(CLONE_NEWNET)": "EPERM",
    "setns": "EPERM",
    "perf_event_open": "EPERM",
    "pivot_root": "EPERM",
    "swapon": "EPERM",
    "reboot": "EPERM",
    "chroot": "EPERM",
    "userfaultfd": "EPERM",
    "clone(CLONE_NEWUSER)": "EPERM",
    "clone(CLONE_NEWNS)": "EPERM",
    "clone(CLONE_NEWPID)": "EPERM",
    "clone(CLONE_NEWNET)": "EPERM",
    "clone(CLONE_NEWUTS)": "EPERM",
    "clone(CLONE_NEWIPC)": "EPERM",
    "clone(CLONE_NEWCGROUP)": "EPERM",
    # clone3's flags live in memory a filter cannot read: the whole call is refused with ENOSYS, so that libc
    # falls back to clone, whose flags the filter does check.
    "clone3(CLONE_NEWUSER)": "ENOSYS",
    "clone3(CLONE_NEWNS)": "ENOSYS",
}
# Harmless calls that must go through: the probe itself works, and plain fork-style clone is not blocked.
ALLOWED_SYSCALLS = {"getpid": "succeeded", "clone(plain)": "succeeded"}

REQUIRED_ETC = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "localtime", "ssl/certs")
FORBIDDEN_ETC = ("shadow", "gshadow", "shadow-", "sudoers", "sudoers.d", "ssh")


# --------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def sandboxed(apusd):
    kind = apusd.info.get("sandbox")
    if kind != "bwrap":
        pytest.skip(f"GET /v1/info reports sandbox={kind!r}, not 'bwrap' (bubblewrap missing or unusable here, or "
                    "--no-sandbox): the sandbox attacks only apply to bwrap")
    if os.geteuid() != 0:
        pytest.skip(f"the tests run apusd as uid {os.geteuid()}, not root: instances get uids of their own, "
                    "cgroups and seccomp only when apusd is root")
    return apusd


@pytest.fixture(scope="module")
def escapist(sandboxed, deployed):
    """The escapist function with the default limits (256Mi, 1000m, 512 pids)."""
    return deployed(ESCAPIST)


def variant(deployed, name: str, manifest: str, concurrency: int = 4) -> str:
    """Deploy (once) a copy of escapist named `name` with `manifest` lines added (e.g. "memory: 128Mi")."""
    dst = deployed.scratch / name
    if not dst.exists():
        copy_function(ESCAPIST, dst, name=name,
                      subs=[(r"^concurrency:.*$", f"concurrency: {concurrency}\n{manifest}")])
    return deployed(dst)


def attack(apusd, name: str, kind: str, timeout: float = 60.0, **params):
    query = urllib.parse.urlencode({"attack": kind, **params})
    return apusd.get(f"/{name}/?{query}", timeout=timeout)


def attack_ok(apusd, name: str, kind: str, timeout: float = 60.0, **params) -> dict:
    r = attack(apusd, name, kind, timeout=timeout, **params)
    assert r.status == 200, f"?attack={kind} {params} on {name}: {r!r}"
    return r.json()


def assert_serving(apusd, name: str) -> dict:
    """A normal call after an attack answers 200 (a new instance may have to start first)."""
    r = apusd.get(f"/{name}/", timeout=60)
    assert r.status == 200, f"{name} no longer serves after the attack: {r!r}"
    doc = r.json()
    assert doc.get("ok") is True, doc
    return doc


def assert_out_of_memory_error(r, what: str):
    assert 500 <= r.status < 600, f"{what}: expected a 5xx error for the OOM-killed instance, got {r!r}"
    assert "out of memory" in r.text.lower(), f"{what}: the error does not say 'out of memory': {r!r}"


def status_ids(line: str) -> list[int]:
    """`Uid:\t100000\t100000\t100000\t100000` -> [real, effective, saved, filesystem]."""
    return [int(v) for v in line.split()]


def wait_ready_instances(apusd, name: str, count: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    ready = []
    while time.monotonic() < deadline:
        instances = apusd.api_json("GET", f"/v1/functions/{name}/instances")["instances"]
        ready = [i for i in instances if i["state"] == "ready"]
        if len(ready) >= count:
            return ready
        time.sleep(0.2)
    raise AssertionError(f"{name}: {len(ready)} ready instances after {timeout:.0f}s, expected {count}")


# --------------------------------------------------------------------------------------------------------------
# Identity, capabilities, seccomp


def test_instance_is_unprivileged_without_capabilities(sandboxed, escapist):
    doc = attack_ok(sandboxed, escapist, "status")
    status = doc["status"]
    uids, gids = status_ids(status["Uid"]), status_ids(status["Gid"])
    assert len(set(uids)) == 1 and uids[0] >= UNPRIVILEGED_UID_MIN, f"uids (real, eff, saved, fs): {status}"
    assert len(set(gids)) == 1 and gids[0] >= UNPRIVILEGED_UID_MIN, f"gids (real, eff, saved, fs): {status}"
    assert doc["uid"] == uids[0] and doc["gid"] == gids[0], doc
    assert 0 not in doc["groups"], f"supplementary group 0 (root) in the instance: {doc['groups']}"
    for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, f"{caps} is not empty: {status}"
    assert status["NoNewPrivs"] == "1", f"no_new_privs is not set: {status}"
    assert status["Seccomp"] == "2", f"no seccomp filter (Seccomp 2 = filter mode): {status}"
    assert_serving(sandboxed, escapist)


def test_each_instance_has_its_own_uid(sandboxed, deployed, escapist):
    """Two instances of one function and one of another, all alive at once: three different uids."""
    pair = variant(deployed, "escapist-pair", "scale: {min: 2, max: 2}", concurrency=1)
    wait_ready_instances(sandboxed, pair, 2)
    seen = {}
    for _ in range(5):  # concurrency 1 and 2 held calls: one per instance (retry if both landed on one)
        results = call_together(3, lambda i: attack(sandboxed, escapist if i == 2 else pair, "status", sleep=1))
        for r in results:
            assert not isinstance(r, BaseException) and r is not None and r.status == 200, results
        docs = [r.json() for r in results]
        if docs[0]["instance"] != docs[1]["instance"]:
            break
    else:
        raise AssertionError(f"two held calls to {pair} (concurrency 1, two instances) never hit both: {docs}")
    for d in docs:
        seen[d["instance"]] = status_ids(d["status"]["Uid"])[0]
    uids = list(seen.values())
    assert len(seen) == 3 and len(set(uids)) == 3, f"instances alive at the same time share a uid: {seen}"
    assert min(uids) >= UNPRIVILEGED_UID_MIN, seen
    assert_serving(sandboxed, pair)


def test_denied_syscalls_fail(sandboxed, escapist):
    doc = attack_ok(sandboxed, escapist, "syscalls")
    results = doc["results"]
    if "error" in results:
        pytest.skip(results["error"])  # the probe knows x86_64 syscall numbers only
    # The harness works: harmless calls go through, and getpid really ran in the probe.
    for name, expected in ALLOWED_SYSCALLS.items():
        assert results.get(name) == expected, f"control {name}: {results.get(name)!r} (all: {results})"
    assert results.get("getpid matches os.getpid()") is True, results
    missing = sorted(set(DENIED_SYSCALLS) - set(results))
    assert not missing, f"the probe did not try {missing}: {results}"
    wrong = {name: results[name] for name, expected in DENIED_SYSCALLS.items() if results[name] != expected}
    assert not wrong, ("syscalls not refused as the filter must (name: got; expected EPERM, clone3 ENOSYS): "
                       f"{wrong}\nall: {results}")
    assert_serving(sandboxed, escapist)


def test_etc_is_minimal(sandboxed, escapist):
    doc = attack_ok(sandboxed, escapist, "etc")
    paths = doc["paths"]
    absent = [n for n in REQUIRED_ETC if not (paths[n]["exists"] and paths[n]["readable"])]
    assert not absent, f"/etc lacks (or cannot read) {absent}: {paths}\n/etc: {doc['listing']}"
    assert paths["ssl/certs"].get("entries", 0) > 0, f"/etc/ssl/certs is empty: {paths['ssl/certs']}"
    assert doc["caReadable"], f"no readable CA certificate in /etc/ssl/certs: {paths['ssl/certs']}"
    passwd_uids = [line.split(":")[2] for line in doc["passwd"] if line.count(":") >= 6]
    assert str(doc["uid"]) in passwd_uids, f"uid {doc['uid']} not in /etc/passwd: {doc['passwd']}"
    group_gids = [line.split(":")[2] for line in doc["group"] if line.count(":") >= 3]
    assert str(doc["gid"]) in group_gids, f"gid {doc['gid']} not in /etc/group: {doc['group']}"
    present = {n: paths[n] for n in FORBIDDEN_ETC if paths[n]["exists"] or paths[n]["readable"]}
    assert not present, f"host files visible in the instance's /etc: {present}\n/etc: {doc['listing']}"
    assert_serving(sandboxed, escapist)


# --------------------------------------------------------------------------------------------------------------
# Memory


@pytest.mark.timeout(150)
def test_out_of_memory_kills_the_instance_and_the_function_recovers(sandboxed, deployed):
    name = variant(deployed, "escapist-oom", "memory: 128Mi")
    before = assert_serving(sandboxed, name)
    small = attack_ok(sandboxed, name, "alloc", mb=32)  # below the limit: fine
    assert small["allocated"] == 32 * MIB, small
    r = attack(sandboxed, name, "alloc", mb=300)
    assert 500 <= r.status < 600, f"allocating 300 MiB at memory: 128Mi did not fail: {r!r}"
    line = wait_for_log(sandboxed, name, "killed: out of memory (limit 128Mi)", timeout=30)
    assert_out_of_memory_error(r, "allocating 300 MiB at memory: 128Mi")
    after = assert_serving(sandboxed, name)
    assert after["instance"] != line["instance"], (
        f"the OOM-killed instance {line['instance']} answered afterwards (before: {before['instance']}): {after}")
    # Counted in the metrics, per function.
    metrics = sandboxed.api_call("GET", "/metrics").text
    kills = [l for l in metrics.splitlines() if l.startswith("apus_instance_oom_kills_total") and f'function="{name}"' in l]
    assert kills and float(kills[0].rsplit(" ", 1)[1]) >= 1, f"no OOM kill counted for {name}: {kills}"
    # Killed once: the request that ran the instance out of memory was not sent to a second instance.
    log = sandboxed.cli_ok("logs", name)
    assert log.count("killed: out of memory") == 1, log


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", ["http1", "h2c"])
def test_an_instance_that_drops_the_call_then_runs_out_of_memory_is_reported_as_such(sandboxed, deployed, transport):
    """The instance closes the caller's connection first and is OOM-killed a moment later: the gateway waits for the
    instance's end (bounded) and says why it failed, instead of a bare "closed the connection"."""
    name = variant(deployed, f"escapist-drop-oom-{transport}", "memory: 128Mi")
    assert_serving(sandboxed, name)
    query = urllib.parse.urlencode({"attack": "drop-alloc", "mb": 300, "delay_ms": 20})
    url = f"{sandboxed.gateway}/{name}/?{query}"
    if transport == "http1":
        r = attack(sandboxed, name, "drop-alloc", mb=300, delay_ms=20)
        status, text = r.status, r.text
    else:
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-m", "60", "-w", "\n%{http_code} %{http_version}", url],
                             capture_output=True, text=True, timeout=90)
        text, _, tail = out.stdout.rpartition("\n")
        status, version = int(tail.split()[0]), tail.split()[1]
        assert version == "2", out
    assert 500 <= status < 600 and "out of memory (limit 128Mi)" in text, f"{transport}: {status} {text}"
    wait_for_log(sandboxed, name, "killed: out of memory (limit 128Mi)", timeout=30)
    assert_serving(sandboxed, name)


def test_memory_limit_is_resident_not_address_space(sandboxed, deployed):
    """At 128Mi an instance may map 1 GiB it does not touch (an address-space rlimit would refuse it) and may
    really use 64 MiB."""
    name = variant(deployed, "escapist-small", "memory: 128Mi")
    reserved = attack_ok(sandboxed, name, "reserve", mb=1024)
    assert reserved["reserved"] == 1024 * MIB, reserved
    used = attack_ok(sandboxed, name, "alloc", mb=64)
    assert used["allocated"] == 64 * MIB, used
    assert_serving(sandboxed, name)


@pytest.mark.timeout(150)
def test_tmp_is_capped_at_the_memory_limit(sandboxed, deployed):
    name = variant(deployed, "escapist-small", "memory: 128Mi")
    r = attack(sandboxed, name, "fill-tmp", mb=300)
    if r.status == 200:
        doc = r.json()
        assert doc["written"] < doc["requested"], f"300 MiB written to /tmp at memory: 128Mi: {doc}"
        assert doc["written"] <= 128 * MIB, f"/tmp took more than the memory limit: {doc}"
        assert doc["errno"] == "ENOSPC", f"the write into /tmp stopped without ENOSPC: {doc}"
    else:
        assert 500 <= r.status < 600, f"writing 300 MiB to /tmp at memory: 128Mi: {r!r}"
        wait_for_log(sandboxed, name, "killed: out of memory (limit 128Mi)", timeout=30)
        assert_out_of_memory_error(r, "writing 300 MiB to /tmp at memory: 128Mi")
    assert_serving(sandboxed, name)


# --------------------------------------------------------------------------------------------------------------
# CPU and pids


def test_cpu_quota_limits_a_spinner(sandboxed, deployed):
    """cpu: 250m over 2 s of wall time is 0.5 s of CPU at most (0.75 allows for accounting slack), for one spinning
    thread and for two spinning processes alike: the quota is the instance's, not per process."""
    name = variant(deployed, "escapist-cpu", "cpu: 250m")
    for procs in (1, 2):
        doc = attack_ok(sandboxed, name, "spin", seconds=2, procs=procs)
        assert doc["cpu"] < 0.75, f"{procs} spinner(s) got {doc['cpu']} s of CPU in {doc['wall']} s at cpu: 250m: {doc}"
    assert_serving(sandboxed, name)


@pytest.mark.timeout(150)
def test_pids_limit_stops_a_fork_bomb(sandboxed, deployed):
    name = variant(deployed, "escapist-pids", "pids: 64")
    doc = attack_ok(sandboxed, name, "forkbomb", n=400)
    assert doc["errno"] == "EAGAIN", f"the fork bomb did not end with EAGAIN: {doc}"
    assert 0 < doc["created"] <= 64, f"pids: 64 but {doc['created']} processes were started: {doc}"
    assert doc["leftAlive"] == 0, doc
    assert_serving(sandboxed, name)
    # Threads count against the same limit.
    doc = attack_ok(sandboxed, name, "forkbomb", n=400, mode="threads")
    assert doc["error"] and doc["created"] < 64, f"pids: 64 but {doc['created']} threads were started: {doc}"
    assert doc["leftAlive"] == 0, doc
    assert_serving(sandboxed, name)


# --------------------------------------------------------------------------------------------------------------
# Limits refused at deploy


def refused(daemon: Apusd, dst, name: str, manifest: str) -> str:
    fn = copy_function(ESCAPIST, dst / name, name=name, subs=[(r"^concurrency:.*$", f"concurrency: 4\n{manifest}")])
    rc, out, err = daemon.cli("deploy", fn)
    text = out + err
    assert rc != 0, f"{manifest!r} was deployed:\n{text}"
    assert daemon.api_call("GET", f"/v1/functions/{name}").status == 404, f"{name} exists after the refusal"
    return text


@pytest.mark.timeout(150)
def test_deploy_refuses_limits_above_the_maximum(tmp_path):
    daemon = Apusd(tmp_path / "apusd", extra_args=("--max-memory", "1Gi", "--max-cpu", "2"))
    try:
        daemon.start()
        text = refused(daemon, tmp_path, "too-much-memory", "memory: 2Gi")
        assert re.search(r"\bmemory\b", text) and re.search(r"\b1Gi\b|\b1073741824\b", text), (
            f"the refusal names neither the field memory nor the limit 1Gi: {text!r}")
        text = refused(daemon, tmp_path, "too-much-cpu", "cpu: 4")
        assert re.search(r"\bcpu\b", text) and re.search(r"\b2\b|\b2000m\b", text), (
            f"the refusal names neither the field cpu nor the limit 2: {text!r}")
        # At the maximum is fine.
        fn = copy_function(ESCAPIST, tmp_path / "at-the-limit", name="at-the-limit",
                           subs=[(r"^concurrency:.*$", "concurrency: 4\nmemory: 1Gi\ncpu: 2")])
        daemon.deploy(fn)
        r = daemon.get("/at-the-limit/", timeout=60)
        assert r.status == 200 and r.json().get("ok") is True, r
    finally:
        daemon.teardown()


def test_deploy_refuses_memory_above_the_hosts(apusd, tmp_path):
    """Without --max-memory the maximum is the host's memory."""
    text = refused(apusd, tmp_path, "more-than-the-host", "memory: 64Ti")
    assert re.search(r"\bmemory\b", text), f"the refusal does not name the field memory: {text!r}"


# --------------------------------------------------------------------------------------------------------------
# What must still work inside the sandbox


@pytest.mark.timeout(180)
def test_jdk_http_server_at_512mi(sandboxed, deployed):
    """A JVM reserves gigabytes of address space; under the resident-memory limit it starts at 512Mi and serves."""
    if not (shutil.which("java") and shutil.which("javac")):
        pytest.skip("no java/javac on this host (Debian: openjdk-17-jdk-headless)")
    dst = deployed.scratch / "jdk-http"
    if not dst.exists():
        # Compiled here so the instance starts the class directly (the source launcher compiles at every start).
        copy_function(FUNCTIONS_DIR / "jdk-http", dst, subs=[(r'"Server\.java"\]', '"-cp", ".", "Server"]')])
        p = subprocess.run(["javac", "-d", str(dst), str(dst / "Server.java")], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"javac failed: {p.stdout}{p.stderr}"
    name = deployed(dst)
    assert "memory: 512Mi" in (dst / "apus.yaml").read_text()
    r = sandboxed.get(f"/{name}/hello", timeout=90)
    assert r.status == 200, f"{r!r}\nlogs:\n{sandboxed.cli_ok('logs', name)[-3000:]}"
    doc = r.json()
    assert doc["runtime"] == "java" and doc["path"] == "/hello", doc
    r = sandboxed.get(f"/{name}/alloc?mb=64", timeout=60)  # the heap is usable, not only reserved
    assert r.status == 200 and r.json()["allocated"] == 64 * MIB, r


@pytest.mark.timeout(150)
@pytest.mark.parametrize("server", ["bootstrap", "command"])
def test_python_grpc_serves_50_concurrent_calls_at_default_memory(sandboxed, deployed, server):
    """50 calls held at once by a threaded Python gRPC server at the default memory (256Mi): the bootstrap's own
    server (Examples/echo-python-grpc, concurrency 100) and functions/grpc-threads (runtime: command,
    ThreadPoolExecutor(max_workers=64) with default 8 MiB thread stacks)."""
    pytest.importorskip("grpc")
    import grpc_support  # imports grpc and the echo example's generated stubs

    calls = 50
    channel = grpc_support.insecure_channel(sandboxed)
    try:
        if server == "bootstrap":
            deployed.example("echo-python-grpc")
            stub = grpc_support.echo_stub(channel)
            futures = [stub.Get.future(grpc_support.req(text=f"call-{i}", sleep_ms=500), timeout=90)
                       for i in range(calls)]
        else:
            deployed(FUNCTIONS_DIR / "grpc-threads")
            hold = channel.unary_unary("/apus.test.Threads/Hold")
            futures = [hold.future(b"500", timeout=90) for _ in range(calls)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except grpc_support.grpc.RpcError as exc:
                outcomes.append(f"{exc.code()}: {exc.details()}")
    finally:
        channel.close()
    failed = [o for o in outcomes if isinstance(o, str)]
    assert not failed, f"{len(failed)} of {calls} calls failed: {failed[:5]}"
    if server == "bootstrap":
        assert sorted(o.text for o in outcomes) == sorted(f"call-{i}" for i in range(calls))
    else:
        docs = [json.loads(o) for o in outcomes]
        assert all(d["thread"].startswith("worker") for d in docs), docs[:3]


def test_cold_starts_take_ready_sandbox_slots_with_the_functions_limits(sandboxed, deployed):
    """A cold start takes a sandbox slot that already joined a cgroup of its own (the join costs an RCU grace period
    on the request path otherwise): the instance runs in it with the function's limits and its own uid."""
    from apus_testlib import instance_memory_limit

    # Below and above what a waiting slot's cgroup allows (256Mi): the limit shrinks or grows in place (cgroup v1
    # wants its memory+swap limit raised first when growing).
    for name, memory in (("escapist-slot", 192), ("escapist-slot-big", 512)):
        name = variant(deployed, name, f"memory: {memory}Mi\ncpu: 500m")
        doc = assert_serving(sandboxed, name)
        log = wait_for_log(sandboxed, name, "ready slot", timeout=15)
        assert log["instance"] == doc["instance"], log
        assert instance_memory_limit(sandboxed, name, doc["instance"]) == memory * MIB
        status = attack_ok(sandboxed, name, "status")["status"]
        assert status_ids(status["Uid"])[0] >= UNPRIVILEGED_UID_MIN and int(status["CapEff"], 16) == 0, status
    assert "sandbox slot could not be used" not in sandboxed.log_tail(400)
