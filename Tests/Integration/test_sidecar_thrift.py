"""apus-sidecar's Thrift path: the app calls a Thrift upstream through the per-upstream port the sidecar opens
(`upstreams.NAME.thrift_port`), with framed and unframed (buffered) strict binary, against python-thrift
endpoints. Calls are balanced one by one (also on one client connection); a killed endpoint's calls go to the
other one; with no endpoint left the caller gets a TApplicationException. Runs under Debian's python3 (python3-thrift),
like test_thrift.py."""

from __future__ import annotations

import subprocess
import time
from collections import Counter

import pytest
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TApplicationException
from thrift.transport import TSocket, TTransport

from sidecar_support import SIDECAR_BIN, Backend, Sidecar, free_port, wait_port

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "Examples" / "calculator-python-thrift" / "gen"))
from calculator import Calculator  # noqa: E402

pytestmark = pytest.mark.skipif(not SIDECAR_BIN.exists(), reason=f"{SIDECAR_BIN} not built")


class ThriftBackend(Backend):
    def __init__(self, name: str, transport: str):
        super().__init__("thrift", name)
        self.transport = transport

    def start(self) -> "ThriftBackend":
        self.proc = subprocess.Popen([sys.executable, str(HERE / "sidecar_thrift_backend.py"), str(self.port), self.name,
                                      self.transport], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        wait_port(self.port)
        return self


def client(port: int, framed: bool):
    sock = TSocket.TSocket("127.0.0.1", port)
    sock.setTimeout(5000)
    transport = TTransport.TFramedTransport(sock) if framed else TTransport.TBufferedTransport(sock)
    transport.open()
    return Calculator.Client(TBinaryProtocol.TBinaryProtocol(transport)), transport


@pytest.fixture
def setup(tmp_path):
    framed = [ThriftBackend(f"framed-{i}", "framed").start() for i in range(2)]
    buffered = [ThriftBackend(f"buffered-{i}", "buffered").start() for i in range(2)]
    config = {"upstreams": {
        "calc-framed": {"endpoints": [b.endpoint() for b in framed], "thrift_port": free_port(),
                        "outlier": {"consecutive_failures": 1, "base_ejection": "5s"}},
        "calc-buffered": {"endpoints": [b.endpoint() for b in buffered], "thrift_port": free_port()},
    }}
    s = Sidecar(tmp_path, config).start()
    yield s, framed, buffered
    s.stop()
    for b in framed + buffered:
        b.kill()


def describe(port, framed):
    calc, transport = client(port, framed)
    try:
        return calc.describe(True, 1, 2, 3, 4, 0.5, "t", b"")
    finally:
        transport.close()


def test_framed_and_unframed_through_the_upstream_port(setup):
    s, framed, buffered = setup
    framed_port, buffered_port = s.ports["thrift"]["calc-framed"], s.ports["thrift"]["calc-buffered"]
    calc, transport = client(framed_port, framed=True)
    assert [calc.add(i, i) for i in range(20)] == [2 * i for i in range(20)]  # many calls on one connection
    transport.close()
    calc, transport = client(buffered_port, framed=False)
    assert calc.add(40, 2) == 42
    transport.close()
    # Each call is balanced on its own, also on one client connection.
    calc, transport = client(framed_port, framed=True)
    assert Counter(calc.describe(True, 1, 2, 3, 4, 0.5, "t", b"") for _ in range(6)) == {"framed-0": 3, "framed-1": 3}
    transport.close()
    calc, transport = client(buffered_port, framed=False)
    assert Counter(calc.describe(True, 1, 2, 3, 4, 0.5, "t", b"") for _ in range(4)) == {"buffered-0": 2, "buffered-1": 2}
    transport.close()


def test_killed_thrift_endpoint_calls_move(setup):
    s, framed, _ = setup
    port = s.ports["thrift"]["calc-framed"]
    calc, transport = client(port, framed=True)
    assert calc.add(1, 1) == 2
    framed[0].kill()
    # The same client connection keeps working: calls to the dead endpoint are retried on the other one.
    assert Counter(calc.describe(True, 1, 2, 3, 4, 0.5, "t", b"") for _ in range(6)) == {"framed-1": 6}
    endpoints = {e["port"]: e for e in s.upstreams()["calc-framed"]["endpoints"]}
    assert endpoints[framed[0].port]["ejected"] is True
    assert 'apus_sidecar_upstream_requests_total{upstream="calc-framed",code="200"}' in s.metrics()
    framed[1].kill()
    with pytest.raises(TApplicationException) as failure:
        calc.add(2, 2)
    assert "calc-framed" in failure.value.message
    transport.close()


def test_inbound_thrift_app(tmp_path):
    """A Thrift app behind the inbound port: bytes relayed to it; each connection counts against the inbound
    concurrency limit (a connection over the limit is closed at once)."""
    app = ThriftBackend("thrift-app", "framed").start()
    s = Sidecar(tmp_path, {"inbound": {"max_concurrency": 1}},
                ["--inbound-port", "0", "--app-port", str(app.port), "--app-protocol", "thrift", "--no-register"]).start()
    try:
        calc, transport = client(s.inbound, framed=True)
        assert calc.add(20, 22) == 42
        assert calc.describe(True, 1, 2, 3, 4, 0.5, "t", b"") == "thrift-app"
        second, second_transport = client(s.inbound, framed=True)
        with pytest.raises(Exception):
            second.add(1, 1)  # over the limit: closed without an answer
        second_transport.close()
        transport.close()
        time.sleep(0.2)
        calc, transport = client(s.inbound, framed=True)  # the slot came back
        assert calc.add(1, 2) == 3
        transport.close()
    finally:
        s.stop()
        app.kill()
