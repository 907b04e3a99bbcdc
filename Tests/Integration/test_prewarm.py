"""Prewarmed Python pools (`apusd --prewarm python3=N`): N generic bootstrap processes wait, sandboxed like
instances, each with an empty code folder `<data-dir>/prewarm/slot-*` of its own; a python3 cold start takes one,
links the version's code into its folder and hands it the instance's port, environment and memory limit, and a
replacement is started at once. Functions whose env the interpreter reads at start (PYTHON*, LD_*, MALLOC_*),
with more than 1 GiB of memory, or with `runtime: command` start cold instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from apus_testlib import (
    instance_memory_limit,
    APUSD,
    EXAMPLES_DIR,
    FUNCTIONS_DIR,
    Apusd,
    assert_error,
    copy_function,
    wait_for_log,
    write_headecho,
)

PREWARM = 2
GONE_STATES = ("stop", "exit", "crash", "dead", "fail", "gone")
READY_RE = re.compile(r"\binstance ready\b")


# ---- helpers --------------------------------------------------------------------------------------------------


def live_instances(apusd, name):
    doc = apusd.api_json("GET", f"/v1/functions/{name}/instances")
    return [i for i in doc["instances"] if not any(s in str(i.get("state", "")).lower() for s in GONE_STATES)]


def slots(apusd) -> dict[str, list[str]]:
    """The prewarm code folders and what each holds (empty: a process still waiting for a function)."""
    root = apusd.data_dir / "prewarm"
    out = {}
    for p in sorted(root.glob("slot-*")) if root.is_dir() else []:
        try:
            out[p.name] = sorted(os.listdir(p))
        except OSError:
            pass  # removed meanwhile
    return out


def empty_slots(apusd) -> set[str]:
    return {name for name, files in slots(apusd).items() if not files}


def wait_for_empty_slots(apusd, count=PREWARM, timeout=15.0) -> set[str]:
    """Until exactly `count` prewarm folders are empty (that many processes wait for a function)."""
    deadline = time.monotonic() + timeout
    while True:
        empty = empty_slots(apusd)
        if len(empty) == count:
            return empty
        assert time.monotonic() < deadline, f"expected {count} empty prewarm folders, got {slots(apusd)}"
        time.sleep(0.1)


def prewarm_processes(apusd) -> list[int]:
    """The daemon's `python3 .../bootstrap.py` processes (not their bubblewrap wrappers) started as prewarmed ones
    (APUS_PREWARM=1 in the environment they were started with: still there in /proc after specialisation)."""
    found = []
    for pid in apusd.leftovers():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_python = Path(cmdline[0].decode(errors="replace")).name.startswith("python")
        if is_python and cmdline[1:2] and cmdline[1].endswith(b"bootstrap.py") and b"APUS_PREWARM=1" in environ:
            found.append(pid)
    return found


def wait_for_prewarm_processes(apusd, count, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := prewarm_processes(apusd)) != count:
        assert time.monotonic() < deadline, f"expected {count} prewarmed bootstrap processes, found {pids}"
        time.sleep(0.1)
    return pids


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(raw[raw.rindex(")") + 2:].split()[1])
        chain.append(pid)
    return chain


def ready_lines(apusd, name) -> list[str]:
    """apusd's `instance ready` log lines of one function (whole log, all runs)."""
    text = apusd.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if READY_RE.search(line) and f"function={name} " in line]


def prewarmed_flags(apusd, name) -> list[str]:
    flags = []
    for line in ready_lines(apusd, name):
        m = re.search(r"\bprewarmed=(\w+)", line)
        assert m, f"`instance ready` line without prewarmed=: {line!r}"
        assert re.search(r"\bcoldStartMs=\d+", line), f"`instance ready` line without coldStartMs=: {line!r}"
        flags.append(m.group(1))
    return flags


def wait_for_ready_lines(apusd, name, count=1, timeout=10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(flags := prewarmed_flags(apusd, name)) < count:
        assert time.monotonic() < deadline, f"{name}: {len(flags)} `instance ready` line(s), expected {count}:\n{apusd.log_tail()}"
        time.sleep(0.1)
    return flags


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A daemon keeping 2 prewarmed Python processes."""
    daemon = Apusd(tmp_path_factory.mktemp("apusd-prewarm"), extra_args=("--prewarm", f"python3={PREWARM}"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.teardown()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("prewarm-functions")


@pytest.fixture(scope="module")
def once(warm):
    """Deploys a function dir into `warm` the first time it is asked for (a second deploy would add a version)."""
    done = set()

    def deploy(func_dir):
        if func_dir not in done:
            warm.deploy(func_dir)
            done.add(func_dir)

    return deploy


# ---- the waiting processes -------------------------------------------------------------------------------------


def test_waiting_processes_are_sandboxed_children_of_apusd(warm):
    empty = wait_for_empty_slots(warm)
    assert set(slots(warm)) == empty, f"a prewarm folder holds files before any function ran: {slots(warm)}"
    pids = wait_for_prewarm_processes(warm, PREWARM)
    for pid in pids:
        chain = ancestors(pid)
        assert warm.proc.pid in chain, f"prewarmed process {pid} is not a descendant of apusd {warm.proc.pid}: {chain}"
        if warm.info.get("sandbox") == "bwrap":
            parent_cmd = Path(f"/proc/{chain[0]}/cmdline").read_bytes().split(b"\0")
            assert parent_cmd and parent_cmd[0].endswith(b"bwrap"), (
                f"prewarmed process {pid} does not run under bubblewrap: parent {parent_cmd[:3]}")
            # Its code dir is one of the (empty) slot folders, mounted at /code.
            mounted = [arg.decode() for arg in parent_cmd if b"/prewarm/slot-" in arg]
            assert any(Path(m).name in empty for m in mounted), (
                f"the sandbox of {pid} does not mount a prewarm folder: {parent_cmd}")
    # Nothing was deployed: no instance was started and no `instance ready` logged.
    assert "instance ready" not in warm.log_tail(400)


def test_prewarmed_instance_gets_the_functions_env_code_and_memory(warm, once):
    wait_for_empty_slots(warm)
    once(FUNCTIONS_DIR / "prewarmcheck")
    r = warm.get("/prewarmcheck/")
    assert r.status == 200, r
    doc = r.json()
    assert wait_for_ready_lines(warm, "prewarmcheck") == ["true"], ready_lines(warm, "prewarmcheck")

    env = doc["env"]
    assert env.get("APUS_FUNCTION") == "prewarmcheck" and env.get("APUS_VERSION") == "1", env
    assert env.get("APUS_HANDLER") == "main.handler" and env.get("APUS_PROTOCOL") == "http", env
    assert env.get("APUS_INSTANCE") == doc["instance"] and doc["version"] == "1", doc
    assert env.get("APUS_PORT", "").isdigit(), env
    assert env.get("FOO") == "bar", env
    assert "APUS_PREWARM" not in env, f"the generic process's marker leaked into the instance: {env}"
    # The platform's own settings, as for a cold start (docs/runtime-contract.md, Environment).
    assert env.get("HOME") == "/tmp" and env.get("PYTHONUNBUFFERED") == "1", env
    assert env.get("MALLOC_ARENA_MAX") == "2", env
    # The code folder is the function's: a sibling module imports, the files are there.
    assert doc["helper"] == "helper-from-the-code-folder", doc
    assert {"main.py", "helper.py", "apus.yaml"} <= set(doc["code"]), doc["code"]
    if warm.info.get("sandbox") == "bwrap":
        assert doc["cwd"] == "/code", doc
    # The waiting process's 1 GiB became the manifest's memory (192Mi): its cgroup's limit where apusd gives
    # instances cgroups (the address space stays unlimited), RLIMIT_AS otherwise.
    if warm.info.get("sandboxLayers", {}).get("cgroups"):
        assert instance_memory_limit(warm, "prewarmcheck", doc["instance"]) == 192 * 1024 * 1024
        assert doc["memoryLimit"] == -1, doc
    else:
        assert doc["memoryLimit"] == 192 * 1024 * 1024, doc

    # The API lists the instance that answered; `apus logs` tells it came from a prewarmed process.
    listed = {i["id"] for i in live_instances(warm, "prewarmcheck")}
    assert doc["instance"] in listed, (doc["instance"], listed)
    started = wait_for_log(warm, "prewarmcheck", "starting from prewarmed process (pid ")
    assert started.group("instance") == doc["instance"], started.group(0)
    ready = wait_for_log(warm, "prewarmcheck", "(prewarmed)")
    assert ready.group("stream") == "apus" and ready.group("instance") == doc["instance"], ready.group(0)
    assert re.search(r"ready in \d+ms \(prewarmed\)", ready.group("text")), ready.group(0)


def test_a_replacement_is_started_and_a_finished_instance_frees_its_folder(warm, once):
    """After a process was taken, a new one waits again; when the instance stops its folder goes away."""
    once(FUNCTIONS_DIR / "prewarmcheck")
    if not live_instances(warm, "prewarmcheck"):
        assert warm.get("/prewarmcheck/").status == 200
    empty = wait_for_empty_slots(warm)  # the replacement for the process the instance took
    used = {name: files for name, files in slots(warm).items() if files}
    assert len(used) == 1, f"expected one prewarm folder holding the instance's code: {slots(warm)}"
    [files] = used.values()
    assert {"main.py", "helper.py", "apus.yaml"} <= set(files), files
    # Both waiting processes and the specialised one were started as prewarmed processes.
    wait_for_prewarm_processes(warm, PREWARM + 1)

    # Idle (3 s) and scaled to zero: the instance stops, its folder is removed, the waiting ones stay.
    deadline = time.monotonic() + 30
    while live_instances(warm, "prewarmcheck") or set(slots(warm)) != empty:
        assert time.monotonic() < deadline, (
            f"instance or its prewarm folder still there: {live_instances(warm, 'prewarmcheck')} {slots(warm)}")
        time.sleep(0.3)
    wait_for_prewarm_processes(warm, PREWARM)


def test_sandbox_of_a_prewarmed_instance_is_the_cold_one(warm, once):
    """As in test_runtime.py for cold starts: /code is the function's code only, /tmp is private, and neither the
    data dir (with the other prewarm folders) nor other functions' code is visible."""
    if warm.info.get("sandbox") != "bwrap":
        pytest.skip(f"sandbox={warm.info.get('sandbox')!r}, not bwrap: nothing to compare")
    once(FUNCTIONS_DIR / "prewarmcheck")
    once(EXAMPLES_DIR / "hello-python")
    assert warm.get("/hello-python/").status == 200  # another function's code in another prewarm folder

    def look(path):
        r = warm.get("/prewarmcheck/?" + urllib.parse.urlencode({"path": str(path)}))
        assert r.status == 200, r
        return r.json()

    assert look("/code")["listing"] == sorted(["apus.yaml", "helper.py", "main.py"])
    assert look("/tmp")["listing"] == [], "/tmp of a prewarmed instance is not empty/private"
    data_dir = warm.data_dir.resolve()
    hidden = [data_dir, data_dir / "prewarm", data_dir / "code", data_dir / "ports.json", warm.log_path]
    hidden += [data_dir / "prewarm" / name for name in slots(warm)]  # the other processes' folders (hello-python's)
    visible = [doc for doc in map(look, hidden) if doc["exists"] or doc["readable"] or doc["listing"] is not None]
    assert not visible, f"a prewarmed instance sees host paths: {visible}"
    assert prewarmed_flags(warm, "hello-python")[-1] == "true"


def test_functions_the_pool_cannot_serve_start_cold(warm, scratch):
    """Interpreter-start env (PYTHON*, LD_*, MALLOC_*), memory above 1 GiB and `runtime: command` start cold and
    leave the waiting processes alone; 1 GiB exactly is still served from the pool."""
    base = FUNCTIONS_DIR / "prewarmcheck"
    cold = {
        "cold-python-env": [(r"^  FOO: bar$", "  FOO: bar\n  PYTHONHASHSEED: '7'")],
        "cold-ld-env": [(r"^  FOO: bar$", "  FOO: bar\n  LD_BIND_NOW: '1'")],
        "cold-malloc-env": [(r"^  FOO: bar$", "  FOO: bar\n  MALLOC_ARENA_MAX: '1'")],
        "cold-big-memory": [(r"^memory:.*$", "memory: 2Gi")],
    }
    for name, subs in cold.items():
        warm.deploy(copy_function(base, scratch / name, name=name, subs=subs))
    warm.deploy(write_headecho(scratch / "cold-command", name="cold-command"))
    warm.deploy(copy_function(base, scratch / "warm-1gi", name="warm-1gi", subs=[(r"^memory:.*$", "memory: 1Gi")]))

    waiting = wait_for_empty_slots(warm)
    for name in cold:
        r = warm.get(f"/{name}/")
        assert r.status == 200, (name, r)
        env = r.json()["env"]
        assert env.get("APUS_FUNCTION") == name, env
        assert wait_for_ready_lines(warm, name) == ["false"], (name, ready_lines(warm, name))
    # The cold-started instances got what they asked for at interpreter start.
    assert warm.get("/cold-python-env/").json()["env"].get("PYTHONHASHSEED") == "7"
    assert warm.get("/cold-malloc-env/").json()["env"].get("MALLOC_ARENA_MAX") == "1"
    big = warm.get("/cold-big-memory/").json()
    if warm.info.get("sandboxLayers", {}).get("cgroups"):
        assert instance_memory_limit(warm, "cold-big-memory", big["instance"]) == 2 * 1024 ** 3
    else:
        assert big["memoryLimit"] == 2 * 1024 ** 3
    r = warm.get("/cold-command/")
    assert r.status == 200 and r.json()["method"] == "GET", r
    assert wait_for_ready_lines(warm, "cold-command") == ["false"]
    assert empty_slots(warm) == waiting, "a function the pool cannot serve took a waiting process"
    for name in list(cold) + ["cold-command"]:
        logs = warm.cli_ok("logs", name)
        assert "prewarmed" not in logs, f"{name} claims a prewarmed start:\n{logs}"

    # 1 GiB is the waiting processes' own limit: still served from the pool, with the limit kept.
    r = warm.get("/warm-1gi/")
    assert r.status == 200, r
    if warm.info.get("sandboxLayers", {}).get("cgroups"):
        assert instance_memory_limit(warm, "warm-1gi", r.json()["instance"]) == 1024 ** 3
    else:
        assert r.json()["memoryLimit"] == 1024 ** 3, r
    assert wait_for_ready_lines(warm, "warm-1gi") == ["true"]


def test_burst_beyond_the_pool_size_is_all_served(warm, scratch):
    """4 instances needed at once with 2 waiting processes: every request succeeds, the first two starts at least
    come from the pool, the rest start cold or from replacements."""
    fn = copy_function(FUNCTIONS_DIR / "counter", scratch / "burst", name="burst",
                       subs=[(r"^concurrency:.*$", "concurrency: 1"), (r"^  max: 3$", "  max: 4")])
    warm.deploy(fn)
    wait_for_empty_slots(warm)
    results = [None] * 4
    barrier = threading.Barrier(4)

    def call(i):
        barrier.wait(10)
        results[i] = warm.get("/burst/?sleep=1.5", timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert all(r is not None and r.status == 200 for r in results), results
    used = {r.json()["instance"] for r in results}
    assert len(used) == 4, f"concurrency 1 and 4 simultaneous requests should use 4 instances: {used}"
    flags = wait_for_ready_lines(warm, "burst", count=4)
    assert len(flags) == 4, flags
    assert flags.count("true") >= PREWARM, f"the {PREWARM} waiting processes were not used: {flags}"
    # And the pool is refilled afterwards.
    wait_for_empty_slots(warm)


def test_handler_that_fails_to_import_is_reported_as_for_a_cold_start(warm, scratch, once):
    fn = copy_function(FUNCTIONS_DIR / "broken", scratch / "warm-broken", name="warm-broken")
    warm.deploy(fn)
    wait_for_empty_slots(warm)
    r = warm.get("/warm-broken/", timeout=30)
    assert_error(r, 503, "unavailable")
    message = r.json()["error"]["message"]
    assert "module_that_does_not_exist" in message or "before it was ready" in message, message
    assert r.header("Retry-After")
    logs = warm.cli_ok("logs", "warm-broken")
    assert "starting from prewarmed process" in logs, logs
    assert "ModuleNotFoundError" in logs and "module_that_does_not_exist" in logs, logs
    assert "ready in" not in logs, logs
    assert not ready_lines(warm, "warm-broken")
    # The failed process does not poison the pool: other functions still get prewarmed starts.
    once(FUNCTIONS_DIR / "prewarmcheck")
    wait_for_empty_slots(warm)
    assert warm.get("/prewarmcheck/").status == 200
    assert prewarmed_flags(warm, "prewarmcheck")[-1] == "true"


def test_grpc_function_is_served_from_the_pool(warm):
    grpc = pytest.importorskip("grpc")
    from grpc_support import CALL_TIMEOUT, ECHO_FUNCTION, echo_stub, insecure_channel, req

    wait_for_empty_slots(warm)
    warm.deploy(EXAMPLES_DIR / ECHO_FUNCTION)
    channel = insecure_channel(warm)
    try:
        r = echo_stub(channel).Get(req(text="from the pool"), timeout=CALL_TIMEOUT)
        assert (r.text, r.served_by) == ("from the pool", "python"), r
        with pytest.raises(grpc.RpcError) as err:  # the function's own status comes through
            echo_stub(channel).Get(req(text="x", fail_code=9, fail_message="not now"), timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and err.value.details() == "not now"
    finally:
        channel.close()
    assert wait_for_ready_lines(warm, ECHO_FUNCTION) == ["true"], ready_lines(warm, ECHO_FUNCTION)
    assert r.instance in {i["id"] for i in live_instances(warm, ECHO_FUNCTION)}
    started = wait_for_log(warm, ECHO_FUNCTION, "starting from prewarmed process")
    assert started.group("instance") == r.instance


# ---- options and shutdown -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("command=1", "runtime command cannot be prewarmed"),
    ("python3=x", "expected RUNTIME=COUNT"),
    ("python3", "expected RUNTIME=COUNT"),
])
def test_bad_prewarm_option_is_refused_at_startup(tmp_path, value, message):
    p = subprocess.run([str(APUSD), "--data-dir", str(tmp_path / "data"), "--api-port", "0", "--http-port", "0",
                        "--prewarm", value], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, f"apusd --prewarm {value} started (rc 0):\n{p.stdout}\n{p.stderr}"
    assert message in p.stderr + p.stdout, p.stderr + p.stdout
    assert not (tmp_path / "data" / "ports.json").exists()


@pytest.mark.timeout(60)
def test_sigterm_stops_the_waiting_processes_and_restart_starts_afresh(tmp_path):
    daemon = Apusd(tmp_path / "apusd", extra_args=("--prewarm", "python3=2"))
    try:
        daemon.start()
        daemon.deploy(FUNCTIONS_DIR / "envdump")
        env = daemon.get("/envdump/").json()
        assert env["APUS_FUNCTION"] == "envdump" and env["FOO"] == "bar", env
        assert wait_for_ready_lines(daemon, "envdump") == ["true"]
        before = wait_for_empty_slots(daemon)
        wait_for_prewarm_processes(daemon, 3)  # 2 waiting, 1 serving envdump

        rc = daemon.stop()
        assert rc == 0, f"apusd exited {rc} on SIGTERM:\n{daemon.log_tail()}"
        deadline = time.monotonic() + 5
        while daemon.leftovers():
            assert time.monotonic() < deadline, f"processes left after apusd exited: {daemon.leftovers()}"
            time.sleep(0.1)

        # A new run starts its own waiting processes in new, empty folders: nothing of the last run is reused.
        daemon.start()
        after = wait_for_empty_slots(daemon)
        assert set(slots(daemon)) == after and not (after & before), (before, slots(daemon))
        assert daemon.get("/envdump/").status == 200
        assert wait_for_ready_lines(daemon, "envdump", count=2)[-1] == "true"
    finally:
        daemon.teardown()
