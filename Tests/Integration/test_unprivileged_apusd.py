"""apusd running as an unprivileged user, with every sandbox layer still on (docs/security.md, "An unprivileged
apusd"): what Deploy/systemd/apusd.service sets up, made by hand here.

As root, the module makes a system user (`apus-test`) with a range of subordinate ids (/etc/subuid, /etc/subgid),
a data directory it owns, a cgroup subtree it owns (v1: one per memory, cpu and pids hierarchy; v2: one with the
three controllers) standing for systemd's `Delegate=yes`, and lends it /run/apus (systemd's `RuntimeDirectory=`).
apusd is then started in that cgroup as that user with CAP_NET_ADMIN as its only capability (ambient, as
`AmbientCapabilities=` gives it), and the attacks of functions/escapist run against it: the instance's uid (from
the subordinate range, mapped in a user namespace of its own), capabilities, no_new_privs, seccomp, the memory
and pids limits, and the network (apusd's ports unreachable, egress none reaching nothing, egress all reaching a
namespace that stands for the outside world). Everything made is removed at the end.

Skips when not run as root, or when bubblewrap, newuidmap/newgidmap (package uidmap), setpriv, ip or nft is missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from apus_testlib import FUNCTIONS_DIR, Apusd, BIN_DIR, copy_function, wait_for_log
from test_network_isolation import OUTSIDE_MARKER, UNREACHABLE, outside_world  # noqa: F401 (a fixture)
from test_sandbox import DENIED_SYSCALLS

ESCAPIST = FUNCTIONS_DIR / "escapist"
USER = "apus-test"
SUBORDINATE = (310000, 1000)  # apus-test:310000:1000 in /etc/subuid and /etc/subgid
MIB = 1024 * 1024
CAP_NET_ADMIN = 1 << 12


def run(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def cgroup_v2() -> bool:
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()


class Host:
    """What the module changes on the host, and how to put it back."""

    def __init__(self):
        self.created_user = False
        self.saved_ids: dict[str, str] = {}
        self.cgroups: list[Path] = []
        self.run_apus: tuple[int, int, int] | None = None
        self.workdir: Path | None = None

    def make_user(self):
        try:
            pwd.getpwnam(USER)
        except KeyError:
            run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER)
            self.created_user = True
        first, count = SUBORDINATE
        for path in ("/etc/subuid", "/etc/subgid"):
            text = Path(path).read_text() if Path(path).exists() else ""
            self.saved_ids[path] = text
            lines = [line for line in text.splitlines() if not line.startswith(f"{USER}:")]
            lines.append(f"{USER}:{first}:{count}")
            Path(path).write_text("\n".join(lines) + "\n")

    def delegate_cgroup(self, uid: int, gid: int) -> list[Path]:
        """A subtree owned by the user, as systemd makes for Delegate=yes; returns the cgroup.procs to join."""
        name = f"apus-unpriv-test-{os.getpid()}"
        if cgroup_v2():
            root = Path("/sys/fs/cgroup")
            (root / "cgroup.subtree_control").write_text("+memory +cpu +pids")
            dirs = [root / name]
        else:
            dirs = [Path("/sys/fs/cgroup") / c / name for c in ("memory", "cpu", "pids")]
        for d in dirs:
            d.mkdir()
            self.cgroups.append(d)
            for entry in [d, *(d / f for f in ("cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"))]:
                if entry.exists():
                    os.chown(entry, uid, gid)
        return [d / "cgroup.procs" for d in dirs]

    def lend_run_apus(self, uid: int, gid: int):
        path = Path("/run/apus")
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
        self.run_apus = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
        os.chown(path, uid, gid)

    def restore(self):
        if self.run_apus:
            uid, gid, mode = self.run_apus
            os.chown("/run/apus", uid, gid)
            os.chmod("/run/apus", mode)
        for d in reversed(self.cgroups):
            for child in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
                if child.is_dir():
                    try:
                        child.rmdir()
                    except OSError:
                        pass
            try:
                d.rmdir()
            except OSError:
                pass
        for path, text in self.saved_ids.items():
            Path(path).write_text(text)
        if self.created_user:
            run("userdel", USER, check=False)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def unprivileged():
    if os.geteuid() != 0:
        pytest.skip("making a user, a delegated cgroup and lending /run/apus needs root")
    missing = [t for t in ("bwrap", "newuidmap", "newgidmap", "setpriv", "ip", "nft", "useradd") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing} (packages bubblewrap, uidmap, util-linux, iproute2, nftables, passwd)")
    host = Host()
    daemon = None
    try:
        host.make_user()
        user = pwd.getpwnam(USER)
        uid, gid = user.pw_uid, user.pw_gid
        probe = run("setpriv", "--reuid", uid, "--regid", gid, "--clear-groups", "unshare", "--user", "true", check=False)
        if probe.returncode != 0:
            pytest.skip(f"unprivileged user namespaces do not work here: {probe.stderr.strip()}")
        procs = host.delegate_cgroup(uid, gid)
        host.lend_run_apus(uid, gid)
        host.workdir = Path(tempfile.mkdtemp(prefix="apus-unprivileged-"))
        os.chmod(host.workdir, 0o755)
        (host.workdir / "data").mkdir(mode=0o700)
        os.chown(host.workdir / "data", uid, gid)
        # A prewarmed Python process serves egress: all functions; the others start in sandbox slots.
        daemon = Apusd(host.workdir, extra_args=("--prewarm", "python3=1"))
        # As systemd would start it: in its delegated cgroup, as the user, CAP_NET_ADMIN its only capability.
        join = " ".join(f'echo $$ > {p} || exit 1;' for p in procs)
        daemon.command_prefix = [
            "/bin/sh", "-c",
            f'{join} exec setpriv --reuid {uid} --regid {gid} --init-groups --inh-caps +net_admin --ambient-caps +net_admin -- "$@"',
            "apusd-as-" + USER,
        ]
        daemon.start()
        yield daemon
    finally:
        if daemon is not None:
            daemon.teardown()
        host.restore()


class Deployer:
    def __init__(self, daemon: Apusd, scratch: Path):
        self.daemon, self.scratch, self.done = daemon, scratch, set()

    def variant(self, name: str, manifest: str = "", concurrency: int = 4) -> str:
        if name not in self.done:
            dst = copy_function(ESCAPIST, self.scratch / name, name=name,
                                subs=[(r"^concurrency:.*$", f"concurrency: {concurrency}\n{manifest}")])
            self.daemon.deploy(dst)
            self.done.add(name)
        return name


@pytest.fixture(scope="module")
def functions(unprivileged, tmp_path_factory):
    return Deployer(unprivileged, tmp_path_factory.mktemp("unprivileged-functions"))


def attack(daemon: Apusd, name: str, kind: str, timeout: float = 60.0, **params):
    query = urllib.parse.urlencode({"attack": kind, **params})
    return daemon.get(f"/{name}/?{query}", timeout=timeout)


def attack_ok(daemon: Apusd, name: str, kind: str, **params) -> dict:
    r = attack(daemon, name, kind, **params)
    assert r.status == 200, f"?attack={kind} {params} on {name}: {r!r}\n{daemon.log_tail(30)}"
    return r.json()


def assert_serving(daemon: Apusd, name: str):
    r = daemon.get(f"/{name}/", timeout=60)
    assert r.status == 200 and r.json().get("ok") is True, f"{name} no longer serves: {r!r}"


def assert_unreachable(doc: dict, what: str):
    assert doc["connected"] is False and doc["errno"] in UNREACHABLE, f"{what} was reachable: {doc}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# --------------------------------------------------------------------------------------------------------------


def test_apusd_runs_unprivileged_with_every_layer(unprivileged):
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{unprivileged.proc.pid}/status").read_text().splitlines()
                  if ":\t" in line)
    uid = pwd.getpwnam(USER).pw_uid
    assert [int(v) for v in status["Uid"].split()] == [uid] * 4, status["Uid"]
    assert int(status["CapEff"], 16) == CAP_NET_ADMIN, f"apusd holds more than CAP_NET_ADMIN: {status['CapEff']}"
    # Started with it ambient (as systemd's AmbientCapabilities= does), apusd empties its ambient set: the programs
    # it runs do not inherit the capability; only its ip/nft commands get it, lent one at a time.
    assert int(status["CapAmb"], 16) == 0, f"apusd passes capabilities on to every program it runs: {status['CapAmb']}"
    layers = unprivileged.info["sandboxLayers"]
    assert layers["apusd"] == "unprivileged" and layers["uidMapping"] == "userns", layers
    for layer in ("namespaces", "unprivileged", "seccomp", "minimalEtc", "network"):
        assert layers[layer] is True, f"{layer} is off: {layers}"
    assert layers.get("cgroups") == ("v2" if cgroup_v2() else "v1"), layers
    log = unprivileged.log_path.read_text()
    assert "apusd runs unprivileged" in log and "SANDBOX INCOMPLETE" not in log, unprivileged.log_tail(20)


def test_check_reports_the_unprivileged_mode(unprivileged):
    """`apusd --check` as the user (outside the daemon's cgroup: it has none delegated) names what is missing."""
    user = pwd.getpwnam(USER)
    data = unprivileged.workdir / "check-data"
    data.mkdir(exist_ok=True)
    os.chown(data, user.pw_uid, user.pw_gid)
    p = run("setpriv", "--reuid", user.pw_uid, "--regid", user.pw_gid, "--init-groups",
            BIN_DIR / "apusd", "--check", "--data-dir", data, check=False, cwd=unprivileged.workdir)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "apusd=unprivileged" in out and "mode: apusd runs unprivileged" in out, out
    assert "CAP_NET_ADMIN" in out, f"--check does not say the capability is missing: {out}"


def test_instance_has_a_subordinate_uid_no_capabilities_and_seccomp(unprivileged, functions):
    name = functions.variant("escapist-u")
    doc = attack_ok(unprivileged, name, "status")
    status = doc["status"]
    first, count = SUBORDINATE
    uids = [int(v) for v in status["Uid"].split()]
    gids = [int(v) for v in status["Gid"].split()]
    assert len(set(uids)) == 1 and first <= uids[0] < first + count, f"uid not from the subordinate range: {status}"
    assert len(set(gids)) == 1 and first <= gids[0] < first + count, status
    assert 0 not in doc["groups"], doc["groups"]
    for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(status[caps], 16) == 0, f"{caps} is not empty: {status}"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    # The same number on the host: the instance's processes belong to a subordinate uid, never to apusd's user.
    pids = run("pgrep", "-u", uids[0]).stdout.split()
    assert pids, f"no host process runs as uid {uids[0]}"
    other = functions.variant("escapist-u2")
    assert attack_ok(unprivileged, other, "status")["uid"] != uids[0], "two functions' instances share a uid"
    assert_serving(unprivileged, name)


def test_prewarmed_and_slot_instances_are_confined_alike(unprivileged, functions):
    """A prewarmed process (egress: all) and a cold start in a sandbox slot (egress: none) get the same layers."""
    first, count = SUBORDINATE
    for name in (functions.variant("escapist-u-warm"), functions.variant("escapist-u-none", "network: {egress: none}")):
        status = attack_ok(unprivileged, name, "status")["status"]
        uid = int(status["Uid"].split()[0])
        assert first <= uid < first + count and int(status["CapEff"], 16) == 0 and status["Seccomp"] == "2", (name, status)
    log = unprivileged.cli_ok("logs", "escapist-u-warm") + unprivileged.cli_ok("logs", "escapist-u-none")
    assert "prewarmed" in log and "ready slot" in log, log


def test_denied_syscalls_fail(unprivileged, functions):
    name = functions.variant("escapist-u")
    results = attack_ok(unprivileged, name, "syscalls")["results"]
    if "error" in results:
        pytest.skip(results["error"])
    wrong = {n: results.get(n) for n, expected in DENIED_SYSCALLS.items() if results.get(n) != expected}
    assert not wrong, f"syscalls not refused: {wrong}"
    assert_serving(unprivileged, name)


@pytest.mark.timeout(150)
def test_memory_limit_kills_with_out_of_memory(unprivileged, functions):
    name = functions.variant("escapist-u-oom", "memory: 128Mi")
    assert attack_ok(unprivileged, name, "alloc", mb=32)["allocated"] == 32 * MIB
    r = attack(unprivileged, name, "alloc", mb=300)
    assert 500 <= r.status < 600 and "out of memory" in r.text.lower(), f"300 MiB at memory: 128Mi: {r!r}"
    wait_for_log(unprivileged, name, "killed: out of memory (limit 128Mi)", timeout=30)
    assert_serving(unprivileged, name)


@pytest.mark.timeout(150)
def test_pids_limit_stops_a_fork_bomb(unprivileged, functions):
    name = functions.variant("escapist-u-pids", "pids: 64")
    doc = attack_ok(unprivileged, name, "forkbomb", n=400)
    assert doc["errno"] == "EAGAIN" and 0 < doc["created"] <= 64, doc
    assert_serving(unprivileged, name)


def test_instance_cannot_reach_apusd(unprivileged, functions):
    name = functions.variant("escapist-u")
    net = attack_ok(unprivileged, name, "net")
    assert sorted(net["interfaces"]) == ["eth0", "lo"], net
    node_link = net["defaultGateway"]
    assert node_link, f"egress: all must have a default route: {net}"
    for port in (port_of(unprivileged.api), port_of(unprivileged.gateway)):
        assert_unreachable(attack_ok(unprivileged, name, "connect", host="127.0.0.1", port=port), f"127.0.0.1:{port}")
        assert_unreachable(attack_ok(unprivileged, name, "connect", host=node_link, port=port), f"{node_link}:{port}")
    assert_serving(unprivileged, name)


def test_egress(unprivileged, functions, outside_world):  # noqa: F811 (the fixture)
    name = functions.variant("escapist-u")
    doc = attack_ok(unprivileged, name, "connect", host=outside_world, port=80)
    assert doc["connected"] is True and OUTSIDE_MARKER in doc["body"], f"egress: all does not reach out: {doc}"
    closed = functions.variant("escapist-u-none", "network: {egress: none}")
    assert attack_ok(unprivileged, closed, "net")["defaultGateway"] is None
    assert_unreachable(attack_ok(unprivileged, closed, "connect", host=outside_world, port=80), "the world with egress: none")


def test_stops_cleanly(unprivileged, functions):
    """At exit apusd stops its instances and namespace holders: nothing of it is left, its links are gone."""
    functions.variant("escapist-u")
    assert unprivileged.stop() == 0, unprivileged.log_tail(30)
    assert not unprivileged.leftovers(), unprivileged.leftovers()
    # Namespace holders end when apusd's end of their stdin closes (at its exit at the latest).
    uid = pwd.getpwnam(USER).pw_uid
    deadline = time.monotonic() + 5
    while run("pgrep", "-u", uid, check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = run("ps", "-o", "pid,args", "-u", uid, check=False).stdout.strip().splitlines()[1:]
    assert not left, f"processes of the apusd user outlived it: {left}"
