"""The Python bootstrap in Thrift mode, run directly (no apusd, no gateway), as the platform starts it: python
Thrift clients against Examples/calculator-python-thrift and Examples/greeter-python-thrift served by
`/usr/bin/python3 bootstrap.py` with APUS_PROTOCOL=thrift.

Covers every transport (framed, buffered, header) x protocol (binary, compact) the bootstrap serves: every base
type, containers, nested structs, declared and undeclared exceptions, unknown methods, oneway, 1 MiB payloads,
pipelined calls, 50 concurrent callers, multiplexed and old-style binary names, THeader headers and transforms,
malformed input, SIGTERM draining, configuration errors, and the exact bytes of the replies.
"""

from __future__ import annotations

import importlib.metadata
import re
import socket
import struct
import subprocess
import threading
import time

import pytest
from thrift.Thrift import TApplicationException, TMessageType

from apus_testlib import REPO_ROOT
from thrift_support import (
    CALCULATOR_DIR,
    COMBINATIONS,
    GREETER_DIR,
    HEADER_MAGIC,
    INSTANCE_PYTHON,
    BootstrapInstance,
    Calculator,
    Greeter,
    all_types_value,
    calc_types,
    call_bytes,
    encode_message,
    expected_describe,
    random_garbage,
    theader_frame,
)

MiB = 1024 * 1024
COMBO_IDS = [f"{t}-{p}" for t, p in COMBINATIONS]


@pytest.fixture(scope="module", params=COMBINATIONS, ids=COMBO_IDS)
def calc(request, tmp_path_factory):
    """The calculator example served by the bootstrap with one transport/protocol combination."""
    transport, protocol = request.param
    inst = BootstrapInstance(CALCULATOR_DIR, tmp_path_factory.mktemp(f"calc-{transport}-{protocol}"),
                             transport=transport, protocol=protocol, concurrency=50)
    inst.start()
    yield inst
    rc = inst.stop()
    assert rc == 0, f"bootstrap exited with {rc} on SIGTERM:\n{inst.stderr()}"


@pytest.fixture
def fresh_calc(tmp_path):
    """A calculator instance of its own (framed, binary) for tests that stop it."""
    inst = BootstrapInstance(CALCULATOR_DIR, tmp_path, concurrency=8)
    yield inst
    inst.kill()


def assert_alive_and_serving(inst: BootstrapInstance):
    assert inst.alive, f"the instance exited ({inst.proc.returncode}):\n{inst.stderr()}"
    with inst.client() as c:
        assert c.add(20, 22) == 42


# ---- every transport x protocol ---------------------------------------------------------------------------------


def test_base_types_as_arguments(calc):
    cases = [
        (True, -128, -32768, -(2 ** 31), -(2 ** 63), -0.0, "", b""),
        (False, 127, 32767, 2 ** 31 - 1, 2 ** 63 - 1, 1.5e300, "grüße, 世界 \x00 end", bytes(range(256))),
        (True, 0, 1, -1, 2 ** 40, float("inf"), "x" * 1000, b"\xff\x00" * 100),
    ]
    with calc.client() as c:
        c.ping()
        for args in cases:
            assert c.describe(*args) == expected_describe(*args), args
        assert c.add(2 ** 31 - 1, 1) == -(2 ** 31)  # i32 arithmetic wraps in the handler


def test_structs_and_containers_round_trip(calc):
    with calc.client() as c:
        for seed in (1, 2, 3):
            value = all_types_value(seed)
            assert c.roundtrip(value) == value
        assert c.roundtrip(calc_types.AllTypes()) == calc_types.AllTypes()  # every field unset
        assert c.sum([1, 2, 3, -(2 ** 62), 2 ** 62]) == 6
        assert c.sum([]) == 0
        assert c.unique(["b", "a", "b", "ü"]) == {"a", "b", "ü"}
        assert c.histogram(["x", "y", "x"]) == {"x": 2, "y": 1}


def test_declared_exception(calc):
    with calc.client() as c:
        with pytest.raises(calc_types.InvalidOperation) as err:
            c.calculate(1, calc_types.Work(num1=1, num2=0, op=calc_types.Operation.DIVIDE))
        assert (err.value.what, err.value.why) == (calc_types.Operation.DIVIDE, "cannot divide by 0")
        with pytest.raises(calc_types.InvalidOperation) as err:
            c.calculate(2, calc_types.Work(num1=1, num2=2, op=99))
        assert err.value.why == "unknown operation"
        # The connection goes on after an exception.
        assert c.calculate(3, calc_types.Work(num1=7, num2=-2, op=calc_types.Operation.DIVIDE)) == -3


def test_undeclared_exception_is_internal_error(calc):
    with calc.client() as c:
        with pytest.raises(TApplicationException) as err:
            c.crash("boom on purpose")
        assert err.value.type == TApplicationException.INTERNAL_ERROR
        assert c.add(1, 1) == 2
    deadline = time.monotonic() + 5
    while "boom on purpose" not in calc.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "RuntimeError: boom on purpose" in calc.stderr()


def test_unknown_method_is_unknown_method(calc):
    with calc.raw() as conn:
        reply = conn.call("noSuchMethod", seqid=77)
        assert reply.is_exception and reply.seqid == 77, reply
        assert reply.value.type == TApplicationException.UNKNOWN_METHOD, reply.value
        assert "noSuchMethod" in str(reply.value)
        assert conn.call("add", Calculator.add_args(3, 4), seqid=78).success == 7  # same connection goes on


def test_oneway_gets_no_reply_and_runs(calc):
    with calc.client() as c:
        c.zap(4242)
        # The next reply on the connection is whoami's: the oneway call sent nothing back.
        assert c.whoami() == f"calc/{calc.instance}"
    calc.wait_for_stdout("zap 4242\n")
    with calc.raw() as conn:
        conn.send(call_bytes("zap", Calculator.zap_args(4343), seqid=5, transport=conn.transport,
                             protocol=conn.protocol, oneway=True))
        reply = conn.call("whoami", seqid=6)
        assert (reply.name, reply.seqid, reply.success) == ("whoami", 6, f"calc/{calc.instance}")
    calc.wait_for_stdout("zap 4343\n")


@pytest.mark.timeout(120)
def test_large_payloads(calc):
    data = bytes(range(256)) * (4 * 1024)  # 1 MiB
    with calc.client() as c:
        assert c.echo(data) == data
        big = bytes(reversed(data)) * 8  # 8 MiB
        assert c.echo(big) == big
        assert c.echo(b"") == b""


def test_pipelined_calls_are_answered_in_order(calc):
    n = 50
    with calc.raw() as conn:
        batch = b"".join(call_bytes("add", Calculator.add_args(i, 1000), seqid=1000 + i, transport=conn.transport,
                                    protocol=conn.protocol) for i in range(n))
        conn.send(batch)  # all 50 calls in one write, before reading any reply
        replies = [conn.read_reply() for _ in range(n)]
    assert [r.seqid for r in replies] == [1000 + i for i in range(n)]
    assert [r.success for r in replies] == [1000 + i for i in range(n)]


@pytest.mark.timeout(120)
def test_50_concurrent_callers(calc):
    results, errors = {}, []

    def caller(i):
        try:
            with calc.client() as c:
                results[i] = (c.slow(300), c.add(i, i))
        except Exception as exc:  # reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(50)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - start
    assert not errors, errors
    assert results == {i: (300, 2 * i) for i in range(50)}
    # One thread per connection: 50 sleeps of 0.3 s overlap (one after the other would take 15 s).
    assert elapsed < 7.5, f"50 concurrent slow(300) calls took {elapsed:.1f}s"


def test_multiplexed_names_reach_the_service(calc):
    with calc.client(multiplexed="Calculator") as c:
        assert c.add(5, 6) == 11
        assert c.whoami().startswith("calc/")
    with calc.raw() as conn:  # another service's prefix is not stripped: unknown method
        reply = conn.call("add", Calculator.add_args(1, 2), seqid=9, service="Greeter")
        assert reply.is_exception and reply.value.type == TApplicationException.UNKNOWN_METHOD, reply


def test_malformed_input_closes_only_that_connection(calc):
    with calc.client() as healthy:
        assert healthy.add(1, 2) == 3
        with calc.raw() as bad:
            bad.send(random_garbage())
            assert bad.closed_by_peer(), "random bytes did not close the connection"
        if calc.transport != "buffered":
            with calc.raw() as bad:
                bad.send(struct.pack("!I", 0x7FFFFFF0) + b"\x80\x01\x00\x01")  # a 2 GB frame announced
                assert bad.closed_by_peer(), "a 2 GB length prefix did not close the connection"
        with calc.raw() as bad:  # a call cut short, then the client closes its side
            whole = call_bytes("add", Calculator.add_args(1, 2), seqid=1, transport=bad.transport,
                               protocol=bad.protocol)
            bad.send(whole[: len(whole) // 2])
            bad.sock.shutdown(socket.SHUT_WR)
            assert bad.closed_by_peer(), "a truncated call did not end the connection"
        assert healthy.add(3, 4) == 7  # the connection opened before still works
    assert_alive_and_serving(calc)


# ---- transport-specific ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_old_binary_form_is_accepted(tmp_path, transport):
    """Clients writing the unversioned binary envelope (strict=False) are served; replies are strict."""
    inst = BootstrapInstance(CALCULATOR_DIR, tmp_path, transport=transport, protocol="binary").start()
    try:
        with inst.client(strict=False) as c:
            assert c.add(40, 2) == 42
            assert c.whoami() == f"calc/{inst.instance}"
        with inst.raw() as conn:
            payload = encode_message("add", Calculator.add_args(1, 1), seqid=3, strict=False)
            assert payload[:4] == b"\x00\x00\x00\x03"  # old form: name length first
            conn.send(payload if transport == "buffered" else struct.pack("!I", len(payload)) + payload)
            reply = conn.read_reply()
            assert (reply.name, reply.seqid, reply.success) == ("add", 3, 2)
    finally:
        assert inst.stop() == 0


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_header_transport_details(tmp_path, protocol):
    """THeader: headers sent by the caller (as the gateway sends client_timeout and apus-request-id) are accepted,
    zlib-transformed requests are served, replies carry the call's seqid and the request's protocol id, and a
    client speaking another transport is refused."""
    inst = BootstrapInstance(CALCULATOR_DIR, tmp_path, transport="header", protocol=protocol).start()
    try:
        with inst.client() as c:
            c.set_header("client_timeout", "5000")
            c.set_header("apus-request-id", "r-123")
            assert c.add(1, 2) == 3
            assert c.reply_headers() == {}, "the python server sends no headers back"
        with inst.client(zlib_transform=True) as c:
            data = b"z" * 100_000
            assert c.echo(data) == data
        with inst.raw() as conn:
            conn.send(call_bytes("add", Calculator.add_args(2, 3), seqid=4242, transport="header", protocol=protocol,
                                 headers={"client_timeout": "100", "apus-function": "calc"}))
            reply = conn.read_reply()
            assert reply.success == 5 and reply.seqid == 4242
            assert reply.header.magic == HEADER_MAGIC and reply.header.seqid == 4242, reply.header
            assert reply.header.protocol_id == {"binary": 0, "compact": 2}[protocol], reply.header
            # The other protocol inside a THeader frame is answered in that protocol.
            other = "compact" if protocol == "binary" else "binary"
            conn.send(call_bytes("add", Calculator.add_args(5, 5), seqid=7, transport="header", protocol=other))
            reply = conn.read_reply()
            assert reply.success == 10 and reply.header.protocol_id == {"binary": 0, "compact": 2}[other]
        with inst.raw(transport="framed") as conn:  # a framed (non-THeader) client is refused
            conn.send(call_bytes("add", Calculator.add_args(1, 1), seqid=1, transport="framed", protocol=protocol))
            assert conn.closed_by_peer()
        assert "closed a Thrift connection" in inst.stderr()
    finally:
        assert inst.stop() == 0


def test_wrong_protocol_is_refused(tmp_path):
    """A binary call to a compact instance closes the connection; the instance keeps serving."""
    inst = BootstrapInstance(GREETER_DIR, tmp_path, transport="framed", protocol="compact", service="Greeter").start()
    try:
        with inst.client(module=Greeter) as g:
            assert g.greet("Ada") == "Hello, Ada!"
        with inst.raw(protocol="binary") as conn:
            conn.send(call_bytes("greet", Greeter.greet_args("Ada"), seqid=1, transport="framed", protocol="binary"))
            assert conn.closed_by_peer()
        with inst.client(module=Greeter, multiplexed="Greeter") as g:
            assert g.greet("Bob") == "Hello, Bob!"
        assert "malformed message" in inst.stderr(), inst.stderr()
    finally:
        assert inst.stop() == 0


# ---- exact bytes ----------------------------------------------------------------------------------------------

# Reply to add(2, 3) with seqid 7, as the bootstrap (Debian python3-thrift 0.17) sends it.
ADD_REPLY_BINARY = bytes.fromhex(
    "80010002" "00000003" "616464" "00000007"  # strict envelope: version|REPLY, name "add", seqid 7
    "08" "0000" "00000005"  # field 0 (success), i32 5
    "00")  # field stop
ADD_REPLY_COMPACT = bytes.fromhex(
    "82" "41" "07" "03" "616464"  # protocol id, REPLY << 5 | version 1, seqid varint 7, name length 3, "add"
    "05" "00"  # field 0 (success): id delta 0 is not a short delta, so long form: type i32 (5), zigzag id 0
    "0a"  # zigzag varint of 5
    "00")  # stop


@pytest.mark.parametrize("transport,protocol", COMBINATIONS, ids=COMBO_IDS)
def test_reply_bytes(tmp_path, transport, protocol):
    inst = BootstrapInstance(CALCULATOR_DIR, tmp_path, transport=transport, protocol=protocol).start()
    try:
        payload = ADD_REPLY_BINARY if protocol == "binary" else ADD_REPLY_COMPACT
        if transport == "framed":
            expected = struct.pack("!I", len(payload)) + payload
        elif transport == "header":
            # LENGTH, 0x0FFF, flags 0, seqid 7, 1 header word: protocol id, 0 transforms, 2 bytes of padding.
            expected = theader_frame(payload, seqid=7, protocol=protocol)
            proto_id = b"\x00" if protocol == "binary" else b"\x02"
            assert expected[4:18] == b"\x0f\xff\x00\x00\x00\x00\x00\x07\x00\x01" + proto_id + b"\x00\x00\x00"
        else:
            expected = payload
        with inst.raw() as conn:
            conn.send(call_bytes("add", Calculator.add_args(2, 3), seqid=7, transport=transport, protocol=protocol))
            got = conn.recv_exact(len(expected))
            assert got.hex() == expected.hex()
            conn.sock.settimeout(0.3)
            with pytest.raises(socket.timeout):  # nothing after the reply
                conn.sock.recv(1)
    finally:
        assert inst.stop() == 0


def test_request_encoders_match_the_thrift_library():
    """The byte-level encoders used by the tests write what the library's own transports write."""
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport import TTransport
    from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

    for protocol, sub in (("binary", THeaderSubprotocolID.BINARY), ("compact", THeaderSubprotocolID.COMPACT)):
        buf = TTransport.TMemoryBuffer()
        prot = THeaderProtocol(buf, (THeaderClientType.HEADERS,), sub)
        prot.set_header(b"client_timeout", b"250")
        Calculator.Client(prot).send_add(2, 3)
        assert buf.getvalue().hex() == call_bytes(
            "add", Calculator.add_args(2, 3), seqid=0, transport="header", protocol=protocol,
            headers={"client_timeout": "250"}).hex()
        buf = TTransport.TMemoryBuffer()
        framed = TTransport.TFramedTransport(buf)
        from thrift_support import protocol_for
        Calculator.Client(protocol_for(framed, protocol)).send_add(2, 3)
        assert buf.getvalue() == call_bytes("add", Calculator.add_args(2, 3), transport="framed", protocol=protocol)


# ---- lifecycle ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_lets_the_call_in_flight_finish(fresh_calc):
    inst = fresh_calc.start()
    idle = inst.raw()
    outcome = {}

    def slow_call():
        try:
            with inst.client() as c:
                outcome["slow"] = c.slow(1500)
                try:
                    c.ping()
                    outcome["after"] = "served"
                except Exception as exc:
                    outcome["after"] = type(exc).__name__
        except Exception as exc:
            outcome["error"] = repr(exc)

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.4)
    signalled = time.monotonic()
    inst.proc.terminate()
    assert idle.closed_by_peer(timeout=2), "an idle connection stayed open after SIGTERM"
    idle.close()
    time.sleep(0.5)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", inst.port), timeout=1).close()
    rc = inst.wait_exit(10)
    took = time.monotonic() - signalled
    caller.join(10)
    assert rc == 0, inst.stderr()
    assert outcome.get("slow") == 1500, outcome
    assert outcome.get("after") not in (None, "served"), f"a call after the drain began was served: {outcome}"
    assert took < 3.0, f"exit took {took:.1f}s after SIGTERM although the call ended after ~1.1s"
    assert "slow 1500 done" in inst.stdout()


@pytest.mark.timeout(60)
def test_sigterm_gives_up_on_calls_after_the_grace_period(fresh_calc):
    inst = fresh_calc.start()
    conn = inst.raw()
    conn.send(call_bytes("slow", Calculator.slow_args(20_000), seqid=1))
    time.sleep(0.3)
    signalled = time.monotonic()
    inst.proc.terminate()
    rc = inst.wait_exit(10)
    took = time.monotonic() - signalled
    assert rc == 0, inst.stderr()
    assert 4.0 < took < 6.0, f"exited {took:.1f}s after SIGTERM (grace is 4.5 s)"
    assert conn.closed_by_peer(timeout=2)
    conn.close()


# ---- configuration errors -------------------------------------------------------------------------------------


def write_function(dir_, source: str):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "main.py").write_text(source)
    return dir_


@pytest.mark.parametrize("env, code, message", [
    ({"APUS_THRIFT_TRANSPORT": "http"}, 2, "APUS_THRIFT_TRANSPORT must be one of framed, buffered, header"),
    ({"APUS_THRIFT_PROTOCOL": "json"}, 2, "APUS_THRIFT_PROTOCOL must be one of binary, compact"),
    ({"APUS_HANDLER": "nosuchmodule.processor"}, 1, "cannot import Thrift processor module 'nosuchmodule'"),
    ({"APUS_HANDLER": "service.nosuchfunction"}, 1, "Thrift processor function 'nosuchfunction' not found"),
])
def test_configuration_errors_exit_with_a_message(tmp_path, env, code, message):
    inst = BootstrapInstance(CALCULATOR_DIR, tmp_path, extra_env=env).start(wait_ready=False)
    rc = inst.wait_exit(15)
    assert rc == code, f"exit {rc}, stderr:\n{inst.stderr()}"
    assert message in inst.stderr(), inst.stderr()


@pytest.mark.parametrize("source, message", [
    ("def processor():\n    return 42\n", "main.processor() returned int, not a Thrift processor"),
    ("def processor():\n    raise ValueError('no processor today')\n", "ValueError: no processor today"),
])
def test_bad_processor_function_exits_with_a_message(tmp_path, source, message):
    fn = write_function(tmp_path / "fn", source)
    inst = BootstrapInstance(fn, tmp_path / "run", handler="main.processor").start(wait_ready=False)
    assert inst.wait_exit(15) == 1, inst.stderr()
    assert message in inst.stderr(), inst.stderr()


def test_default_handler_is_main_processor(tmp_path):
    fn = write_function(tmp_path / "fn", (
        "import sys\n"
        f"sys.path.insert(0, {str(CALCULATOR_DIR / 'gen')!r})\n"
        "from calculator import Calculator\n"
        "class H:\n"
        "    def add(self, a, b):\n"
        "        return a - b\n"
        "def processor():\n"
        "    return Calculator.Processor(H())\n"))
    inst = BootstrapInstance(fn, tmp_path / "run", handler="")
    inst.env.pop("APUS_HANDLER")
    inst.start()
    try:
        with inst.client() as c:
            assert c.add(5, 3) == 2
    finally:
        assert inst.stop() == 0


# ---- generated code and library versions ----------------------------------------------------------------------


def test_generated_code_loads_with_both_thrift_libraries():
    """The committed code (Scripts/gen-thrift, thrift-compiler 0.17) imports under the instances' interpreter
    (Debian python3-thrift) and under the tests' (pip thrift, pinned in Scripts/install-deps)."""
    pinned = re.search(r"^THRIFT_VERSION=(\S+)", (REPO_ROOT / "Scripts" / "install-deps").read_text(), re.M)
    assert pinned and importlib.metadata.version("thrift") == pinned.group(1)
    for func_dir in (CALCULATOR_DIR, GREETER_DIR):
        for path in (func_dir / "gen").rglob("*.py"):
            head = path.read_text().splitlines()[:3]
            assert path.name == "__init__.py" or "Autogenerated by Thrift Compiler (0.17.0)" in head[1], path
    code = (
        "import sys; sys.dont_write_bytecode = True\n"
        f"sys.path[:0] = [{str(CALCULATOR_DIR / 'gen')!r}, {str(GREETER_DIR / 'gen')!r}]\n"
        "from calculator import Calculator, ttypes; from greeter import Greeter\n"
        "import thrift; print('ok')\n")
    p = subprocess.run([INSTANCE_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert not list(CALCULATOR_DIR.rglob("__pycache__")) and not list(GREETER_DIR.rglob("__pycache__"))


def test_reply_message_types():
    """Sanity of the constants the byte tables above rely on."""
    assert (TMessageType.CALL, TMessageType.REPLY, TMessageType.EXCEPTION, TMessageType.ONEWAY) == (1, 2, 3, 4)
