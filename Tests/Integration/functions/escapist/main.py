"""Tries to get out of (or past) the instance sandbox; each attack reports what happened as JSON.

    GET /?attack=status                 /proc/self/status: Uid, Gid, Groups, capability sets, NoNewPrivs, Seccomp
    GET /?attack=syscalls               every syscall the seccomp filter must refuse, tried for real (probe_syscalls.py
                                        in a child process): {name: "EPERM" | "ENOSYS" | other errno | "succeeded"}
    GET /?attack=etc                    what /etc holds, and whether /etc/shadow & co. can be read
    GET /?attack=forkbomb&n=400         start up to n processes (&mode=threads: threads), then clean them all up
    GET /?attack=spin&seconds=2         burn CPU for that long (wall time); &procs=2 spins in 2 child processes
    GET /?attack=alloc&mb=300           allocate that many MiB and write every page (resident memory)
    GET /?attack=drop-alloc&mb=300      cut every TCP connection the process holds (its caller sees the connection
                                        close before an answer), wait &delay_ms=20, then allocate as alloc does
    GET /?attack=reserve&mb=1024        map that many MiB of address space, touch only the first MiB
    GET /?attack=fill-tmp&mb=300        write that many MiB to a file in /tmp (removed afterwards)
    GET /?attack=connect&host=H&port=P  open a TCP connection (1 s timeout), send an HTTP request (&method=, &path=,
                                        &hostHeader=, &body=),
                                        report what came back: {"connected": bool, "errno": ..., "reply": first line}
    GET /?attack=net                    what the instance sees of the network: /proc/net/tcp listeners, interfaces,
                                        routes, $APUS_SIDECAR
    GET /                               {"ok": true, ...}: the follow-up call that proves the instance still serves

Any call may add &sleep=SECONDS (at most 10) to hold the request that long first, so that concurrent calls land on
different instances of a concurrency-1 function.

Every attack is bounded (n, seconds, mb) and cleans up after itself when it survives, so a surviving instance
keeps serving normally.
"""

import errno
import json
import mmap
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024 * 1024
PAGE = mmap.PAGESIZE

STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                 "Seccomp", "Seccomp_filters")


def errno_name(exc):
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, str(code)) if code is not None else None


def describe(exc):
    return f"{type(exc).__name__}: {exc}"


def ident(context):
    return {"instance": context.instance_id, "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


# ---- status


def attack_status(query, context):
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                fields[key] = value.strip()
    try:
        with open("/proc/self/cgroup") as f:
            cgroups = f.read().splitlines()
    except OSError as exc:
        cgroups = [describe(exc)]
    return {**ident(context), "status": fields, "groups": os.getgroups(), "cgroup": cgroups}


# ---- syscalls


def attack_syscalls(query, context):
    # In a child process: a call that does succeed (unshare, clone) changes only that throwaway process.
    p = subprocess.run([sys.executable, os.path.join(HERE, "probe_syscalls.py")], capture_output=True, text=True,
                       timeout=30)
    if p.returncode != 0:
        return {"statusCode": 500, "body": json.dumps({"probeExit": p.returncode, "stdout": p.stdout[-2000:],
                                                        "stderr": p.stderr[-2000:]}),
                "headers": {"Content-Type": "application/json"}}
    return {**ident(context), "results": json.loads(p.stdout)}


# ---- /etc


def probe_path(path):
    out = {"exists": os.path.lexists(path), "readable": False, "error": None}
    try:
        if os.path.isdir(path):
            out["listing"] = sorted(os.listdir(path))[:50]
            out["entries"] = len(os.listdir(path))
            out["readable"] = True
        else:
            with open(path, "rb") as f:
                out["bytes"] = len(f.read(1 << 20))
            out["readable"] = True
    except OSError as exc:
        out["error"] = describe(exc)
    return out


def attack_etc(query, context):
    try:
        listing = sorted(os.listdir("/etc"))
    except OSError as exc:
        listing = [describe(exc)]
    paths = {name: probe_path("/etc/" + name) for name in (
        "passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "localtime", "ssl/certs",
        "shadow", "gshadow", "sudoers", "sudoers.d", "ssh", "shadow-", "passwd-")}
    # One CA certificate of /etc/ssl/certs actually readable (entries are often symlinks into /usr/share).
    ca_readable = None
    certs = paths["ssl/certs"].get("listing") or []
    for name in certs:
        full = "/etc/ssl/certs/" + name
        if os.path.isfile(full):
            try:
                with open(full, "rb") as f:
                    ca_readable = name if b"BEGIN CERTIFICATE" in f.read(1 << 16) else ca_readable
            except OSError:
                continue
            if ca_readable:
                break

    def read_lines(path):
        try:
            with open(path) as f:
                return f.read().splitlines()[:200]
        except OSError as exc:
            return [describe(exc)]

    return {**ident(context), "listing": listing, "paths": paths, "caReadable": ca_readable,
            "passwd": read_lines("/etc/passwd"), "group": read_lines("/etc/group")}


# ---- fork bomb (bounded)


def forkbomb_processes(n):
    children, error = [], None
    try:
        for _ in range(n):
            children.append(subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    except OSError as exc:
        error = exc
    finally:
        created = len(children)
        for child in children:
            try:
                child.kill()
            except OSError:
                pass
        for child in children:
            try:
                child.wait(timeout=10)
            except Exception:  # noqa: BLE001 (report whatever is left, below)
                pass
    left = sum(1 for c in children if c.returncode is None)
    return {"created": created, "error": describe(error) if error else None,
            "errno": errno_name(error) if error else None, "leftAlive": left}


def forkbomb_threads(n):
    stop = threading.Event()
    threads, error = [], None
    try:
        for _ in range(n):
            t = threading.Thread(target=stop.wait, args=(60,), daemon=True)
            t.start()
            threads.append(t)
    except (RuntimeError, OSError) as exc:  # RuntimeError: "can't start new thread" (pthread_create EAGAIN)
        error = exc
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    return {"created": len(threads), "error": describe(error) if error else None,
            "errno": errno_name(error) if error else None,
            "leftAlive": sum(1 for t in threads if t.is_alive())}


def attack_forkbomb(query, context):
    n = min(int(query.get("n", "400")), 2000)
    mode = query.get("mode", "processes")
    result = forkbomb_threads(n) if mode == "threads" else forkbomb_processes(n)
    return {**ident(context), "requested": n, "mode": mode, **result}


# ---- CPU


SPIN_CHILD = "import sys, time\nend = float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def attack_spin(query, context):
    seconds = min(float(query.get("seconds", "2")), 10.0)
    procs = min(int(query.get("procs", "1")), 8)
    wall0 = time.monotonic()
    if procs <= 1:
        cpu0 = time.process_time()
        end = wall0 + seconds
        while time.monotonic() < end:
            pass
        cpu = time.process_time() - cpu0
    else:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        end = wall0 + seconds
        children = [subprocess.Popen([sys.executable, "-c", SPIN_CHILD, repr(end)]) for _ in range(procs)]
        for child in children:
            child.wait(timeout=seconds + 30)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**ident(context), "procs": procs, "seconds": seconds, "cpu": round(cpu, 4),
            "wall": round(time.monotonic() - wall0, 4)}


# ---- memory


def attack_alloc(query, context):
    size = min(int(query.get("mb", "1")), 64 * 1024) * MIB
    block = bytearray(size)  # calloc'd: pages are only resident once written
    for offset in range(0, size, PAGE):
        block[offset] = 1
    touched = sum(block[::PAGE])
    del block
    return {**ident(context), "allocated": size, "pagesTouched": touched}


def attack_drop_alloc(query, context):
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except (OSError, ValueError):
            continue  # not a socket
        try:
            if sock.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.getpeername()  # connected
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()
    time.sleep(min(int(query.get("delay_ms", "20")), 1000) / 1000)
    return attack_alloc(query, context)


def attack_reserve(query, context):
    size = min(int(query.get("mb", "1024")), 64 * 1024) * MIB
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    region = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        touched = min(size, MIB)
        region[0:touched] = b"\x01" * touched
    finally:
        region.close()
    return {**ident(context), "reserved": size, "touched": touched}


def tmp_mount():
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/tmp":
                    return line.strip()
    except OSError as exc:
        return describe(exc)
    return None


def attack_fill_tmp(query, context):
    requested = min(int(query.get("mb", "1")), 64 * 1024) * MIB
    path = f"/tmp/fill-{uuid.uuid4().hex}"
    chunk = b"\xa5" * MIB
    written, error = 0, None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while written < requested:
            n = os.write(fd, chunk[: min(MIB, requested - written)])
            if n <= 0:
                break
            written += n
    except OSError as exc:
        error = exc
    finally:
        os.close(fd)
        os.unlink(path)
    return {**ident(context), "requested": requested, "written": written,
            "error": describe(error) if error else None, "errno": errno_name(error) if error else None,
            "tmpMount": tmp_mount()}


# ---- network


def attack_connect(query, context):
    import socket
    host, port = query.get("host", "127.0.0.1"), int(query.get("port", "80"))
    timeout = min(float(query.get("timeout", "1")), 5.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except socket.timeout:
        return {**ident(context), "target": f"{host}:{port}", "connected": False, "errno": "timeout"}
    except OSError as exc:
        return {**ident(context), "target": f"{host}:{port}", "connected": False, "errno": errno_name(exc), "error": describe(exc)}
    reply = ""
    try:
        host_header = query.get("hostHeader", host)
        method = query.get("method", "GET")
        body = query.get("body", "")
        sock.sendall(f"{method} {query.get('path', '/')} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        reply = data.decode("latin-1")
    except OSError as exc:
        reply = describe(exc)
    finally:
        sock.close()
    return {**ident(context), "target": f"{host}:{port}", "connected": True, "reply": reply.split("\r\n", 1)[0],
            "body": reply.split("\r\n\r\n", 1)[-1][:2000]}


def attack_net(query, context):
    listeners = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A":  # LISTEN
                        listeners.append(int(fields[1].split(":")[1], 16))
        except OSError:
            pass
    with open("/proc/net/dev") as f:
        interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    import socket
    import struct

    def address(hex_le):
        return socket.inet_ntoa(struct.pack("<I", int(hex_le, 16)))

    routes, gateway = [], None
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            iface, destination, via, _flags, _refcnt, _use, _metric, mask = line.split()[:8]
            routes.append({"interface": iface, "destination": address(destination), "mask": address(mask),
                           "gateway": address(via)})
            if destination == "00000000":
                gateway = address(via)
    own = None
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("10.213.0.1", 9))  # no packet is sent: only the source address is chosen
        own = probe.getsockname()[0]
        probe.close()
    except OSError:
        pass
    return {**ident(context), "listeningPorts": sorted(set(listeners)), "interfaces": interfaces, "routes": routes,
            "defaultGateway": gateway, "address": own,
            "sidecar": os.environ.get("APUS_SIDECAR"), "apusPort": int(os.environ.get("APUS_PORT", "0"))}


ATTACKS = {
    "connect": attack_connect,
    "net": attack_net,
    "status": attack_status,
    "syscalls": attack_syscalls,
    "etc": attack_etc,
    "forkbomb": attack_forkbomb,
    "spin": attack_spin,
    "alloc": attack_alloc,
    "drop-alloc": attack_drop_alloc,
    "reserve": attack_reserve,
    "fill-tmp": attack_fill_tmp,
}


def handler(event, context):
    sleep = min(float(event["query"].get("sleep", "0")), 10.0)
    if sleep > 0:
        time.sleep(sleep)
    attack = event["query"].get("attack")
    if attack is None:
        return {"ok": True, **ident(context)}
    run = ATTACKS.get(attack)
    if run is None:
        return {"statusCode": 400, "body": f"unknown attack {attack!r}; known: {sorted(ATTACKS)}"}
    print(f"escapist: attack {attack} {event['rawQuery']}", flush=True)
    return run(event["query"], context)
