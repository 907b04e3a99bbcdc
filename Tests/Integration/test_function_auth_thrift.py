"""Per-function invocation auth (`auth: {tokens: true}`) on the gateway's Thrift port, with Debian's python3-thrift
(THeader client) and raw TTHeader frames: the token travels as the `authorization` string header; framed and
buffered calls carry no headers, so they are refused with a TApplicationException that says where to put it.
Runs under /usr/bin/python3 (see Scripts/test).
"""

from __future__ import annotations

import pytest
from thrift.Thrift import TApplicationException

from apus_testlib import Apusd, apusd_has_option, copy_function
from thrift_support import CALCULATOR_DIR, Calculator, RawConnection, ThriftClient

pytestmark = pytest.mark.skipif(not apusd_has_option("--thrift-port"), reason="apusd has no --thrift-port")

FUNCTION = "calc-guarded"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Apusd(tmp_path_factory.mktemp("apusd-thrift-auth"))
    try:
        d.start()
        d.deploy(copy_function(CALCULATOR_DIR, tmp_path_factory.mktemp("fns") / FUNCTION, name=FUNCTION,
                               subs=[(r"\Z", "auth:\n  tokens: true\n")]))
        yield d
    finally:
        d.teardown()


def token(daemon, name: str, scope: str) -> str:
    return daemon.cli_json("token", "create", name, "--scope", scope)["secret"]


def refusal(call) -> TApplicationException:
    with pytest.raises(TApplicationException) as refused:
        call()
    return refused.value


def test_theader_calls_carry_the_token(daemon):
    good = token(daemon, "thrift-caller", f"invoke:{FUNCTION}")
    reader = token(daemon, "thrift-reader", "read")
    with ThriftClient(daemon.host, daemon.thrift_port, Calculator, "header") as client:
        assert "unauthenticated" in refusal(lambda: client.add(1, 2)).message
        client.set_header("authorization", f"Bearer {reader}")
        message = refusal(lambda: client.add(1, 2)).message
        assert "forbidden" in message and f"invoke:{FUNCTION}" in message, message
        client.set_header("authorization", f"Bearer {good}")
        assert client.add(40, 2) == 42
        # The connection goes on after refusals, and every call is checked.
        client.set_header("authorization", "Bearer apus_revoked-or-never-made")
        assert "unauthenticated" in refusal(lambda: client.add(1, 2)).message


def test_framed_calls_cannot_carry_a_token_and_are_told_so(daemon):
    with ThriftClient(daemon.host, daemon.thrift_port, Calculator, "framed") as client:
        error = refusal(lambda: client.add(1, 2))
        assert "unauthenticated" in error.message and "THeader" in error.message, error.message


def test_ttheader_calls_carry_the_token(daemon):
    good = token(daemon, "ttheader-caller", f"invoke:{FUNCTION}")
    with RawConnection(daemon.host, daemon.thrift_port, "ttheader", "binary") as conn:
        reply = conn.call("add", Calculator.add_args(1, 2), seqid=7)
        assert reply.is_exception and "unauthenticated" in reply.value.message, reply
        reply = conn.call("add", Calculator.add_args(20, 22), seqid=8, headers={"authorization": f"Bearer {good}"})
        assert (reply.seqid, reply.success) == (8, 42), reply
