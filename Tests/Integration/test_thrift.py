"""Thrift through the gateway: python Thrift clients call Examples/calculator-python-thrift (framed, binary),
a compact copy of it (service CalculatorCompact) and Examples/greeter-python-thrift (framed, compact) on the
gateway's Thrift port (`apusd --thrift-port`, ports.json "thrift").

Covers every client transport (framed, buffered, THeader) x protocol (binary, compact) with every base type,
containers, nested structs, declared exceptions, oneway and 1 MiB payloads; routing by multiplexed service name,
by declared plain method names, by the THeader key apus-function and the TTHeader key TO_SERVICE; two functions
on one multiplexed connection; unknown methods and services (TApplicationException UNKNOWN_METHOD); a protocol the
function does not speak; deadlines from THeader client_timeout and TTHeader RPCTimeout against a sleeping
function; 50 pipelined calls matched by seqid; 50 concurrent callers; and malformed input (random bytes, a 2 GB
length prefix, a truncated frame, a frame above the size limit), each closing only its own connection.

Scripts/test runs this module under Debian's python3, so the clients are Debian's python3-thrift (0.17).
Skipped until apusd has the Thrift listener (`--thrift-port` in `apusd --help`). The function side is covered
without the gateway by test_thrift_runtime.py.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import threading
import time

import pytest
from thrift.protocol import TMultiplexedProtocol
from thrift.Thrift import TApplicationException

from apus_testlib import apusd_has_option, copy_function
from thrift_support import (
    CALCULATOR_DIR,
    CALCULATOR_FUNCTION,
    CALCULATOR_SERVICE,
    COMBINATIONS,
    GREETER_FUNCTION,
    GREETER_SERVICE,
    TT_RPC_TIMEOUT,
    TT_TO_METHOD,
    TT_TO_SERVICE,
    TTHEADER_MAGIC,
    Calculator,
    GREETER_DIR,
    Greeter,
    RawConnection,
    ThriftClient,
    all_types_value,
    calc_types,
    call_bytes,
    expected_describe,
    random_garbage,
    wait_for_log,
)

pytestmark = pytest.mark.skipif(not apusd_has_option("--thrift-port"),
                                reason="apusd has no --thrift-port yet (the gateway's Thrift listener)")

MiB = 1024 * 1024
COMPACT_FUNCTION = "calculator-compact-thrift"
COMPACT_SERVICE = "CalculatorCompact"
# The function and service a client of each protocol calls (the gateway converts transports, not protocols).
TARGETS = {"binary": (CALCULATOR_FUNCTION, CALCULATOR_SERVICE), "compact": (COMPACT_FUNCTION, COMPACT_SERVICE)}
COMBO_IDS = [f"{t}-{p}" for t, p in COMBINATIONS]
DEFAULT_MAX_FRAME = 16 * MiB  # apusd --thrift-max-frame default


@pytest.fixture(scope="module")
def thrift_fns(apusd, deployed):
    assert apusd.thrift_port, "apusd lists --thrift-port but ports.json has no \"thrift\" port"
    deployed.example(CALCULATOR_FUNCTION)
    deployed.example(GREETER_FUNCTION)
    # The calculator again, compact, under another service name and without plain method names (those are unique
    # across functions).
    deployed(copy_function(CALCULATOR_DIR, deployed.scratch / COMPACT_FUNCTION, name=COMPACT_FUNCTION, subs=[
        (r"^  service: Calculator$", f"  service: {COMPACT_SERVICE}"),
        (r"^  protocol: binary$", "  protocol: compact"),
        (r"^  (#.*|methods:.*)\n", ""),
    ]))
    return apusd


def gw_client(apusd, transport="framed", protocol="binary", multiplexed=None, module=Calculator, **kw):
    return ThriftClient(apusd.host, apusd.thrift_port, module, transport, protocol, multiplexed, **kw)


def gw_raw(apusd, transport="framed", protocol="binary", **kw) -> RawConnection:
    return RawConnection(apusd.host, apusd.thrift_port, transport, protocol, **kw)


def assert_app_exception(exc, *types):
    assert isinstance(exc, TApplicationException), f"expected a TApplicationException, got {exc!r}"
    assert exc.type in types, f"TApplicationException type {exc.type} ({exc}), expected one of {types}"


# ---- every transport x protocol ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport,protocol", COMBINATIONS, ids=COMBO_IDS)
def test_every_transport_and_protocol(thrift_fns, transport, protocol):
    apusd = thrift_fns
    function, service = TARGETS[protocol]
    with gw_client(apusd, transport, protocol, multiplexed=service) as c:
        c.ping()
        assert c.whoami().startswith(f"{function}/")
        for args in [(True, -128, -32768, -(2 ** 31), -(2 ** 63), -0.0, "", b""),
                     (False, 127, 32767, 2 ** 31 - 1, 2 ** 63 - 1, 1.5e300, "grüße, 世界", bytes(range(256)))]:
            assert c.describe(*args) == expected_describe(*args)
        for seed in (1, 2):
            assert c.roundtrip(all_types_value(seed)) == all_types_value(seed)
        assert c.sum([1, 2, 3]) == 6
        assert c.unique(["b", "a", "b"]) == {"a", "b"}
        assert c.histogram(["x", "y", "x"]) == {"x": 2, "y": 1}
        with pytest.raises(calc_types.InvalidOperation) as err:
            c.calculate(1, calc_types.Work(num1=1, num2=0, op=calc_types.Operation.DIVIDE))
        assert err.value.why == "cannot divide by 0"
        with pytest.raises(TApplicationException) as app_err:
            c.crash("boom")
        assert_app_exception(app_err.value, TApplicationException.INTERNAL_ERROR)
        data = random.Random(5).randbytes(MiB)
        assert c.echo(data) == data
        zap_id = random.randrange(1, 2 ** 31)
        c.zap(zap_id)
        assert c.add(2, 3) == 5  # the oneway call produced no reply to confuse this one
    wait_for_log(apusd, function, f"zap {zap_id}")


@pytest.mark.parametrize("transport,protocol", COMBINATIONS, ids=COMBO_IDS)
def test_multiplexed_replies_carry_the_bare_method_name(thrift_fns, transport, protocol):
    """As Apache Thrift's TMultiplexedProcessor answers: a call named `Service:method` gets its REPLY, its declared
    EXCEPTION-carrying reply and every TApplicationException (the instance's and the gateway's own) named `method`
    (Go's TStandardClient fails a reply named otherwise with WRONG_METHOD_NAME)."""
    function, service = TARGETS[protocol]
    with gw_raw(thrift_fns, transport, protocol) as conn:
        reply = conn.call("add", Calculator.add_args(2, 3), seqid=11, service=service)
        assert (reply.name, reply.seqid, reply.success) == ("add", 11, 5), reply
        work = calc_types.Work(num1=1, num2=0, op=calc_types.Operation.DIVIDE)
        reply = conn.call("calculate", Calculator.calculate_args(1, work), seqid=12, service=service)
        assert (reply.name, reply.seqid) == ("calculate", 12), reply
        assert not reply.is_exception and reply.value.ouch is not None, reply
        reply = conn.call("crash", Calculator.crash_args("boom"), seqid=13, service=service)  # the instance's own
        assert (reply.name, reply.seqid, reply.is_exception) == ("crash", 13, True), reply
        reply = conn.call("noSuchMethod", seqid=14, service=service)  # written by the instance's processor
        assert (reply.name, reply.seqid, reply.is_exception) == ("noSuchMethod", 14, True), reply
        reply = conn.call("add", Calculator.add_args(1, 1), seqid=15, service="NoSuchService")  # written by the gateway
        assert (reply.name, reply.seqid, reply.is_exception) == ("add", 15, True), reply
        assert_app_exception(reply.value, TApplicationException.UNKNOWN_METHOD)
        reply = conn.call("add", Calculator.add_args(1, 1), seqid=16)  # not multiplexed: routed by declared method
        if protocol == "binary":
            assert (reply.name, reply.seqid, reply.success) == ("add", 16, 2), reply
        else:  # the compact copy declares no plain methods; the binary function refuses a compact call
            assert (reply.name, reply.seqid, reply.is_exception) == ("add", 16, True), reply


# ---- routing ----------------------------------------------------------------------------------------------------


def test_plain_method_names_route_by_declared_methods(thrift_fns):
    apusd = thrift_fns
    for transport in ("framed", "buffered", "header"):
        with gw_client(apusd, transport, "binary") as c:
            assert c.whoami().startswith(f"{CALCULATOR_FUNCTION}/"), transport
            assert c.add(20, 22) == 42
    with gw_client(apusd, "framed", "compact", module=Greeter) as g:
        assert g.greet("Ada") == "Hello, Ada!"


def test_one_multiplexed_connection_reaches_two_functions(thrift_fns):
    apusd = thrift_fns
    with gw_client(apusd, "framed", "compact", multiplexed=COMPACT_SERVICE) as calc:
        greeter = Greeter.Client(TMultiplexedProtocol.TMultiplexedProtocol(calc.protocol, GREETER_SERVICE))
        for i in range(5):
            assert calc.whoami().startswith(f"{COMPACT_FUNCTION}/")
            assert greeter.greet(f"n{i}") == f"Hello, n{i}!"
            assert calc.add(i, i) == 2 * i


def test_apus_function_header_pins_the_function(thrift_fns):
    """`whoami` is declared by calculator-python-thrift (binary); apus-function sends a compact call to the compact
    copy instead."""
    with gw_client(thrift_fns, "header", "compact") as c:
        c.set_header("apus-function", COMPACT_FUNCTION)
        assert c.whoami().startswith(f"{COMPACT_FUNCTION}/")


def test_apus_version_pins_or_is_refused(thrift_fns):
    """THeader `apus-version` pins a version like HTTP's X-Apus-Version; a value that is not a version number is
    refused with the reason (it used to be ignored, and the call routed by weight)."""
    with gw_client(thrift_fns, "header", "binary", multiplexed=CALCULATOR_SERVICE) as c:
        c.set_header("apus-version", "1")
        assert c.add(1, 2) == 3
        c.set_header("apus-version", "latest")
        with pytest.raises(TApplicationException) as err:
            c.add(1, 2)
        assert_app_exception(err.value, TApplicationException.INTERNAL_ERROR)
        assert "apus-version must be a version number (got latest)" in str(err.value), err.value
        assert c.reply_headers().get("apus-error-code") == "400", c.reply_headers()


def test_ttheader_to_service_routes_and_is_answered_in_ttheader(thrift_fns):
    with gw_raw(thrift_fns, "ttheader", "binary") as conn:
        reply = conn.call("add", Calculator.add_args(40, 2), seqid=31,
                          int_headers={TT_TO_SERVICE: CALCULATOR_SERVICE, TT_TO_METHOD: "add"})
        assert reply.header.magic == TTHEADER_MAGIC, reply.header
        assert (reply.seqid, reply.header.seqid, reply.success) == (31, 31, 42)
        reply = conn.call("whoami", seqid=32, int_headers={TT_TO_SERVICE: CALCULATOR_SERVICE})
        assert reply.success.startswith(f"{CALCULATOR_FUNCTION}/")


# ---- errors -----------------------------------------------------------------------------------------------------


def test_unknown_methods_and_services_are_unknown_method(thrift_fns):
    with gw_raw(thrift_fns, "framed", "binary") as conn:
        for seqid, (method, service) in enumerate([("noSuchMethod", None), ("noSuchMethod", CALCULATOR_SERVICE),
                                                   ("add", "NoSuchService")], start=100):
            reply = conn.call(method, seqid=seqid, service=service)
            assert reply.is_exception and reply.seqid == seqid, (method, service, reply)
            assert_app_exception(reply.value, TApplicationException.UNKNOWN_METHOD)
            # The connection goes on.
            assert conn.call("add", Calculator.add_args(1, seqid), seqid=seqid + 50).success == seqid + 1


def test_protocol_the_function_does_not_speak_is_refused_at_call(thrift_fns):
    with gw_client(thrift_fns, "framed", "compact", multiplexed=CALCULATOR_SERVICE) as c:
        with pytest.raises(TApplicationException) as err:
            c.add(1, 2)
        assert_app_exception(err.value, TApplicationException.INTERNAL_ERROR, TApplicationException.PROTOCOL_ERROR)
        assert "compact" in str(err.value) and "binary" in str(err.value), str(err.value)


@pytest.mark.timeout(60)
def test_theader_client_timeout_is_the_deadline(thrift_fns):
    with gw_client(thrift_fns, "header", "binary", multiplexed=CALCULATOR_SERVICE) as c:
        assert c.add(1, 1) == 2  # warm
        c.set_header("client_timeout", "300")
        start = time.monotonic()
        with pytest.raises(TApplicationException) as err:
            c.slow(3000)
        took = time.monotonic() - start
        assert_app_exception(err.value, TApplicationException.INTERNAL_ERROR)
        assert 0.25 < took < 2.5, f"the 300 ms deadline answered after {took:.2f}s"
        assert c.reply_headers().get("apus-error-code") == "504", c.reply_headers()
        # The instance's late reply must not reach this connection as the answer to a later call.
        assert c.add(2, 3) == 5
        time.sleep(3)
        assert c.add(3, 4) == 7


@pytest.mark.timeout(60)
def test_ttheader_rpc_timeout_is_the_deadline(thrift_fns):
    with gw_raw(thrift_fns, "ttheader", "binary") as conn:
        start = time.monotonic()
        reply = conn.call("slow", Calculator.slow_args(3000), seqid=9,
                          int_headers={TT_TO_SERVICE: CALCULATOR_SERVICE, TT_RPC_TIMEOUT: "300"})
        took = time.monotonic() - start
        assert reply.is_exception and reply.seqid == 9, reply
        assert_app_exception(reply.value, TApplicationException.INTERNAL_ERROR)
        assert 0.25 < took < 2.5, f"the 300 ms deadline answered after {took:.2f}s"


# ---- many calls ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["framed", "buffered", "header"])
def test_50_pipelined_calls_matched_by_seqid(thrift_fns, transport):
    """50 calls in one write on one connection, the earlier ones sleeping longer: every reply carries its call's
    seqid and result."""
    n = 50
    with gw_raw(thrift_fns, transport, "binary") as conn:
        conn.send(b"".join(call_bytes("slow", Calculator.slow_args((n - i) * 10), seqid=5000 + i,
                                      transport=transport, protocol="binary") for i in range(n)))
        replies = [conn.read_reply() for _ in range(n)]
    got = {r.seqid: r.success for r in replies}
    assert got == {5000 + i: (n - i) * 10 for i in range(n)}


@pytest.mark.timeout(120)
def test_50_concurrent_callers(thrift_fns):
    results, errors = {}, []

    def caller(i):
        transport, protocol = COMBINATIONS[i % len(COMBINATIONS)]
        function, service = TARGETS[protocol]
        try:
            with gw_client(thrift_fns, transport, protocol, multiplexed=service) as c:
                results[i] = (c.slow(200), c.add(i, i), c.whoami().split("/")[0])
        except Exception as exc:
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert results == {i: (200, 2 * i, TARGETS[COMBINATIONS[i % len(COMBINATIONS)][1]][0]) for i in range(50)}


def test_oneway_is_never_answered(thrift_fns):
    zap_id = random.randrange(1, 2 ** 31)
    with gw_raw(thrift_fns, "framed", "binary") as conn:
        conn.send(call_bytes("zap", Calculator.zap_args(zap_id), seqid=1, oneway=True))
        reply = conn.call("add", Calculator.add_args(1, 2), seqid=2)
        assert (reply.seqid, reply.success) == (2, 3), reply
    wait_for_log(thrift_fns, CALCULATOR_FUNCTION, f"zap {zap_id}")


# ---- malformed input --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_malformed_input_closes_only_that_connection(thrift_fns):
    apusd = thrift_fns
    with gw_client(apusd, "framed", "binary", multiplexed=CALCULATOR_SERVICE) as healthy:
        assert healthy.add(1, 2) == 3
        with gw_raw(apusd) as bad:
            bad.send(random_garbage())
            assert bad.closed_by_peer(), "random bytes did not close the connection"
        with gw_raw(apusd) as bad:
            bad.send(struct.pack("!I", 0x7FFFFFF0) + b"\x80\x01\x00\x01")  # a 2 GB frame announced
            assert bad.closed_by_peer(), "a 2 GB length prefix did not close the connection"
        with gw_raw(apusd) as bad:
            bad.send(struct.pack("!I", DEFAULT_MAX_FRAME + 1) + b"\x80\x01\x00\x01" + b"\x00" * 4096)
            assert bad.closed_by_peer(), "a frame above the size limit did not close the connection"
        for transport in ("framed", "header", "buffered"):
            with gw_raw(apusd, transport) as bad:  # a call cut short, then the client closes its side
                whole = call_bytes("add", Calculator.add_args(1, 2), seqid=1, transport=transport,
                                   service=CALCULATOR_SERVICE)
                bad.send(whole[: len(whole) // 2])
                bad.sock.shutdown(socket.SHUT_WR)
                assert bad.closed_by_peer(), f"a truncated {transport} call did not end the connection"
        assert healthy.add(3, 4) == 7  # the connection opened before is unaffected
    with gw_client(apusd, "framed", "binary", multiplexed=CALCULATOR_SERVICE) as fresh:
        assert fresh.add(5, 6) == 11


# ---- runtime: command ---------------------------------------------------------------------------------------------

COMMAND_SERVER = """\
# A plain Thrift server (no Apus bootstrap): TSimpleServer, buffered transport, binary protocol, on $APUS_PORT.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))
from greeter import Greeter  # noqa: E402
from thrift.protocol import TBinaryProtocol  # noqa: E402
from thrift.server import TServer  # noqa: E402
from thrift.transport import TSocket, TTransport  # noqa: E402


class Handler:
    def greet(self, name):
        return "command server greets " + name


server = TServer.TSimpleServer(
    Greeter.Processor(Handler()), TSocket.TServerSocket(host="127.0.0.1", port=int(os.environ["APUS_PORT"])),
    TTransport.TBufferedTransportFactory(), TBinaryProtocol.TBinaryProtocolFactory())
print("serving", flush=True)
server.serve()
"""


def test_command_runtime_thrift_server_behind_a_framing_conversion(thrift_fns, deployed):
    """runtime: command runs any Thrift server; here an unframed (buffered) one, called by a framed client."""
    fn = deployed.scratch / "greeter-command-thrift"
    fn.mkdir()
    shutil.copytree(GREETER_DIR / "gen", fn / "gen")
    (fn / "server.py").write_text(COMMAND_SERVER)
    (fn / "apus.yaml").write_text(
        "name: greeter-command-thrift\nruntime: command\ncommand: [/usr/bin/python3, server.py]\n"
        "protocol: thrift\nthrift: {service: GreeterCommand, transport: buffered, protocol: binary}\n")
    deployed(fn)
    with gw_client(thrift_fns, "framed", "binary", multiplexed="GreeterCommand", module=Greeter) as client:
        assert client.greet("ada") == "command server greets ada"
        assert client.greet("grace") == "command server greets grace"


def test_thrift_service_and_method_names_belong_to_one_function(thrift_fns, deployed):
    """A second function declaring a Thrift service, or a plain method, another function owns is refused."""
    same_service = copy_function(GREETER_DIR, deployed.scratch / "greeter-twin", name="greeter-twin")
    rc, out, err = thrift_fns.cli("deploy", same_service)
    assert rc != 0 and GREETER_SERVICE in out + err and GREETER_FUNCTION in out + err, out + err

    same_method = copy_function(GREETER_DIR, deployed.scratch / "greeter-methods", name="greeter-methods", subs=[
        (r"^  service: Greeter$", "  service: GreeterMethods"),
        (r"^  methods: .*$", "  methods: [add]"),
    ])
    rc, out, err = thrift_fns.cli("deploy", same_method)
    assert rc != 0 and "method add" in out + err and CALCULATOR_FUNCTION in out + err, out + err
    for name in ("greeter-twin", "greeter-methods"):
        assert thrift_fns.api_call("GET", f"/v1/functions/{name}").status == 404
