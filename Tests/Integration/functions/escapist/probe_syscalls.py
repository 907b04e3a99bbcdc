"""Tries every syscall the instance's seccomp filter must refuse; prints {name: outcome} as JSON.

Run as its own (single-threaded) process by main.py. Each call runs in a forked child, so a call that does go
through (unshare, clone) or a filter that kills instead of failing only ends that child. Outcomes: the errno name
("EPERM", "ENOSYS", ...), "succeeded", or "killed by signal N".

The arguments are chosen so that a call is harmless even when nothing stops it (nonexistent paths, bad fds,
bad magic numbers, invalid flags), and where possible so that the kernel itself would answer with another errno
than EPERM (ENOENT, EBADF, ESRCH, EFAULT, EINVAL, ...): EPERM then comes from the filter. x86_64 numbers.
"""

import ctypes
import errno
import json
import os
import platform
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SIGCHLD = 17
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = {
    "CLONE_NEWUSER": CLONE_NEWUSER, "CLONE_NEWNS": CLONE_NEWNS, "CLONE_NEWPID": CLONE_NEWPID,
    "CLONE_NEWNET": CLONE_NEWNET, "CLONE_NEWUTS": CLONE_NEWUTS, "CLONE_NEWIPC": CLONE_NEWIPC,
    "CLONE_NEWCGROUP": CLONE_NEWCGROUP,
}
AT_FDCWD = -100
O_NONBLOCK = 0o4000
KEY_SPEC_SESSION_KEYRING = -3

NR = {
    "getpid": 39, "clone": 56, "ptrace": 101, "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166,
    "swapon": 167, "reboot": 169, "init_module": 175, "delete_module": 176, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "finit_module": 313, "bpf": 321, "userfaultfd": 323, "clone3": 435,
}

NOWHERE = b"/apus-probe-does-not-exist"


def arg(value):
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, bytes):
        return ctypes.c_char_p(value)
    if isinstance(value, int):
        return ctypes.c_long(value)
    return value  # already a ctypes object (pointer, buffer)


def raw(name, *args):
    """libc.syscall(NR[name], *args) -> (return value, errno)."""
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(NR[name]), *(arg(a) for a in args))
    return ret, ctypes.get_errno()


def clone_like(name, *args):
    """A clone/clone3 that may create a child: the child leaves at once; the outcome is the parent's."""
    ret, err = raw(name, *args)
    if ret == 0:  # the new child (a copy of this single-threaded process): leave without running anything else
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)
    return ret, err


def clone3_args(flags):
    # struct clone_args, CLONE_ARGS_SIZE_VER0 (64 bytes): flags, pidfd, child_tid, parent_tid, exit_signal,
    # stack, stack_size, tls.
    data = struct.pack("=8Q", flags, 0, 0, 0, SIGCHLD, 0, 0, 0)
    return ctypes.create_string_buffer(data, len(data)), len(data)


def clone3(flags):
    buf, size = clone3_args(flags)
    return clone_like("clone3", ctypes.cast(buf, ctypes.c_void_p), size)


# name -> zero-argument callable returning (ret, errno). Expected: EPERM for all of these except clone3 (ENOSYS)
# and the controls at the end.
PROBES = {
    "mount": lambda: raw("mount", b"none", NOWHERE, b"tmpfs", 0, None),
    "umount2": lambda: raw("umount2", NOWHERE, 0),
    "open_by_handle_at": lambda: raw("open_by_handle_at", -1, None, 0),
    "name_to_handle_at": lambda: raw("name_to_handle_at", AT_FDCWD, b"/", None, None, 0),
    "ptrace": lambda: raw("ptrace", 2, 0x3FFFFFFF, 0, 0),  # PTRACE_PEEKDATA on a pid that cannot exist
    "kexec_load": lambda: raw("kexec_load", 0, 0, None, 0xDEAD0000),  # invalid flags
    "init_module": lambda: raw("init_module", None, 0, b""),
    "finit_module": lambda: raw("finit_module", -1, b"", 0),
    "delete_module": lambda: raw("delete_module", b"apus_probe_no_such_module", O_NONBLOCK),
    "bpf": lambda: raw("bpf", 0x7FFF, None, 0),  # no such command
    "keyctl": lambda: raw("keyctl", 0x7FFF, 0, 0, 0, 0),  # no such operation
    "add_key": lambda: raw("add_key", b"apus-no-such-type", b"probe", None, 0, KEY_SPEC_SESSION_KEYRING),
    "request_key": lambda: raw("request_key", b"apus-no-such-type", b"probe", None, 0),
    "unshare(CLONE_NEWUSER)": lambda: raw("unshare", CLONE_NEWUSER),
    "unshare(CLONE_NEWNS)": lambda: raw("unshare", CLONE_NEWNS),
    "unshare(CLONE_NEWNET)": lambda: raw("unshare", CLONE_NEWNET),
    "setns": lambda: raw("setns", -1, 0),
    "perf_event_open": lambda: raw("perf_event_open", None, 0, -1, -1, 0),
    "pivot_root": lambda: raw("pivot_root", NOWHERE + b"-a", NOWHERE + b"-b"),
    "swapon": lambda: raw("swapon", NOWHERE, 0),
    "reboot": lambda: raw("reboot", 0, 0, 0, None),  # wrong magic numbers
    "chroot": lambda: raw("chroot", NOWHERE),
    "userfaultfd": lambda: raw("userfaultfd", 0xDEAD0000),  # invalid flags
}
for _flag_name, _flag in NAMESPACE_FLAGS.items():
    PROBES[f"clone({_flag_name})"] = (lambda f: lambda: clone_like("clone", f | SIGCHLD, 0, 0, 0, 0))(_flag)
PROBES["clone3(CLONE_NEWUSER)"] = lambda: clone3(CLONE_NEWUSER)
PROBES["clone3(CLONE_NEWNS)"] = lambda: clone3(CLONE_NEWNS)

# Controls: harmless calls that must go through (the harness works; fork still works).
CONTROLS = {
    "getpid": lambda: raw("getpid"),
    "clone(plain)": lambda: clone_like("clone", SIGCHLD, 0, 0, 0, 0),
}


def outcome(ret, err):
    if ret >= 0:
        return "succeeded"
    return errno.errorcode.get(err, f"errno {err}")


def run_in_child(call):
    """Runs call() in a forked child; returns its outcome string."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            text = outcome(*call())
        except BaseException as exc:  # noqa: BLE001 (reported to the parent)
            text = f"probe raised {type(exc).__name__}: {exc}"
        os.write(w, text.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return text or f"child exited {os.WEXITSTATUS(status)} without a result"


def main():
    if platform.machine() != "x86_64":
        print(json.dumps({"error": f"syscall numbers are for x86_64, this is {platform.machine()}"}))
        return
    results = {name: run_in_child(call) for name, call in {**PROBES, **CONTROLS}.items()}
    # getpid must also return this very process's pid when called here (not only "not fail").
    ret, _ = raw("getpid")
    results["getpid matches os.getpid()"] = bool(ret == os.getpid())
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
