"""Thrift through the gateway with a Go client: Apache Thrift's Go library (Debian's golang-thrift-dev 0.17) and
the generated Go code of IDL/examples/calculator.thrift call Examples/calculator-python-thrift (framed, binary)
and its compact copy (service CalculatorCompact) on the gateway's Thrift port.

Go's generated client (TStandardClient.Recv) refuses a reply whose name is not the bare method it called, also
when TMultiplexedProtocol wrote the call as "Calculator:add": Apache Thrift's TMultiplexedProcessor answers
"add". So every call here, multiplexed or not, checks that the gateway names its replies, declared exceptions and
the TApplicationExceptions it writes itself (unknown method or service, deadline) as the server would. And Go's
client writes a oneway call with message type CALL, not ONEWAY (test_go_client_oneway_call).

The client is Tests/Integration/go/src/apustest/thriftcall (see Tests/Integration/go/README.md), built once per
module with `go build` in GOPATH mode. It prints `ok <check> <detail>` or `FAIL <check>: <reason>` per check and
exits non-zero when one failed. This module imports no thrift package, so Scripts/test runs it with the other
integration tests. Skipped when `go` is missing (Scripts/install-deps installs golang-go and golang-thrift-dev)
or apusd has no Thrift listener.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from apus_testlib import EXAMPLES_DIR, apusd_has_option, copy_function, wait_for_log

GO_PATH_DIR = Path(__file__).resolve().parent / "go"  # GOPATH root of the client and the generated code
GO_THRIFT_PATH = Path("/usr/share/gocode")  # GOPATH root of Debian's golang-thrift-dev
GO = shutil.which("go")

CALCULATOR_DIR = EXAMPLES_DIR / "calculator-python-thrift"
CALCULATOR_FUNCTION = "calculator-python-thrift"
CALCULATOR_SERVICE = "Calculator"
# The same names as test_thrift.py's compact copy, so that either module deploys it for the other.
COMPACT_FUNCTION = "calculator-compact-thrift"
COMPACT_SERVICE = "CalculatorCompact"
UNKNOWN_SERVICE = "NoSuchService"

# The checks of test_go_client; the header transport adds the deadline check. The oneway zap has its own test.
COMMON_CHECKS = ["ping", "add", "whoami", "describe", "sum", "histogram", "roundtrip", "calculate", "crash",
                 "unknown-method"]

pytestmark = [
    pytest.mark.skipif(not apusd_has_option("--thrift-port"),
                       reason="apusd has no --thrift-port yet (the gateway's Thrift listener)"),
    pytest.mark.skipif(GO is None, reason="no `go` on PATH (Scripts/install-deps installs golang-go and "
                                          "golang-thrift-dev)"),
]


@pytest.fixture(scope="module")
def thriftcall(tmp_path_factory) -> Path:
    """The Go client, built into a temporary directory (its build cache too: no HOME needed, nothing written to the
    repository)."""
    work = tmp_path_factory.mktemp("thriftcall")
    binary = work / "thriftcall"
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{GO_PATH_DIR}:{GO_THRIFT_PATH}",
               GOCACHE=str(work / "gocache"), GOFLAGS="", CGO_ENABLED="0")
    p = subprocess.run([GO, "build", "-o", str(binary), "apustest/thriftcall"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (
        f"go build apustest/thriftcall failed ({p.returncode}); GOPATH={env['GOPATH']} (is golang-thrift-dev "
        f"installed?)\n{p.stdout}{p.stderr}")
    return binary


@pytest.fixture(scope="module")
def calculators(apusd, deployed):
    """calculator-python-thrift and its compact copy, deployed as test_thrift.py does."""
    assert apusd.thrift_port, "apusd lists --thrift-port but ports.json has no \"thrift\" port"
    deployed.example(CALCULATOR_FUNCTION)
    if COMPACT_FUNCTION not in deployed.done:
        deployed(copy_function(CALCULATOR_DIR, deployed.scratch / COMPACT_FUNCTION, name=COMPACT_FUNCTION, subs=[
            (r"^  service: Calculator$", f"  service: {COMPACT_SERVICE}"),
            (r"^  protocol: binary$", "  protocol: compact"),
            (r"^  (#.*|methods:.*)\n", ""),
        ]))
    return apusd


class Run:
    """One run of the Go client: its exit status, output and `ok` lines ({check: detail})."""

    def __init__(self, cmd: list[str], p: subprocess.CompletedProcess):
        self.cmd, self.rc, self.stdout, self.stderr = cmd, p.returncode, p.stdout, p.stderr
        self.ok: dict[str, str] = {}
        self.failed: list[str] = []
        for line in p.stdout.splitlines():
            if line.startswith("ok "):
                check, _, detail = line[3:].partition(" ")
                self.ok[check] = detail
            elif line.startswith("FAIL "):
                self.failed.append(line)

    def report(self) -> str:
        return (f"`{' '.join(self.cmd)}` exited {self.rc}\nstdout:\n{self.stdout}stderr:\n{self.stderr}")

    def assert_passed(self, checks: list[str]):
        assert self.rc == 0 and not self.failed, "the Go Thrift client failed:\n" + self.report()
        assert list(self.ok) == checks, f"checks run: {list(self.ok)}, expected {checks}\n" + self.report()


def run_client(apusd, binary: Path, *args: str, timeout: float = 100.0) -> Run:
    cmd = [str(binary), "-addr", f"{apusd.host}:{apusd.thrift_port}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Run(cmd, p)


# id: (client flags, the function that must serve the calls)
CASES = {
    "multiplexed-framed-binary": (["-transport", "framed", "-protocol", "binary", "-service", CALCULATOR_SERVICE],
                                  CALCULATOR_FUNCTION),
    "multiplexed-buffered-binary": (["-transport", "buffered", "-protocol", "binary",
                                     "-service", CALCULATOR_SERVICE], CALCULATOR_FUNCTION),
    "multiplexed-header-compact": (["-transport", "header", "-protocol", "compact", "-service", COMPACT_SERVICE],
                                   COMPACT_FUNCTION),
    # Plain method names: routed by the methods calculator-python-thrift declares ...
    "plain-framed-binary": (["-transport", "framed", "-protocol", "binary"], CALCULATOR_FUNCTION),
    # ... or by the THeader key apus-function.
    "plain-header-compact-apus-function": (["-transport", "header", "-protocol", "compact",
                                            "-function", COMPACT_FUNCTION], COMPACT_FUNCTION),
}


def transport_of(flags: list[str]) -> str:
    return flags[flags.index("-transport") + 1]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", list(CASES))
def test_go_client(calculators, thriftcall, case):
    apusd = calculators
    flags, function = CASES[case]
    checks = COMMON_CHECKS + (["deadline"] if transport_of(flags) == "header" else [])
    run = run_client(apusd, thriftcall, *flags, "-checks", ",".join(checks))
    run.assert_passed(checks)
    assert run.ok["add"] == "5", run.report()
    assert run.ok["whoami"].startswith(f"{function}/"), run.report()
    assert run.ok["calculate"] == "42 InvalidOperation(4, cannot divide by 0)", run.report()
    assert run.ok["crash"] == "INTERNAL_ERROR", run.report()
    assert run.ok["unknown-method"] == "UNKNOWN_METHOD", run.report()
    if "deadline" in checks:
        assert run.ok["deadline"] == "INTERNAL_ERROR apus-error-code 504", run.report()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", ["multiplexed-framed-binary", "multiplexed-header-compact", "plain-framed-binary"])
def test_go_client_oneway_call(calculators, thriftcall, case):
    """The oneway zap reaches the function, and the next call on the connection is answered at once with its own
    reply. Go's TStandardClient writes a oneway call as message type CALL (not ONEWAY), so nothing but the IDL
    says that no reply follows."""
    apusd = calculators
    flags, function = CASES[case]
    zap_id = str(random.randrange(1, 2 ** 31))
    run = run_client(apusd, thriftcall, *flags, "-checks", "zap,add", "-zap-id", zap_id)
    run.assert_passed(["zap", "add"])
    assert run.ok["zap"] == zap_id, run.report()
    wait_for_log(apusd, function, f"zap {zap_id}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags", [["-transport", "framed", "-protocol", "binary", "-service", CALCULATOR_SERVICE],
                                   ["-transport", "header", "-protocol", "compact", "-service", COMPACT_SERVICE],
                                   ["-transport", "framed", "-protocol", "binary"]],
                         ids=["multiplexed-framed-binary", "multiplexed-header-compact", "plain-framed-binary"])
def test_go_client_unknown_service_is_unknown_method(calculators, thriftcall, flags):
    """A call to a multiplexed service nothing serves reaches the Go client as TApplicationException UNKNOWN_METHOD
    (not WRONG_METHOD_NAME, not a closed connection), and the connection goes on."""
    run = run_client(calculators, thriftcall, *flags, "-unknown-service", UNKNOWN_SERVICE,
                     "-checks", "add,unknown-service,add")
    assert run.rc == 0 and not run.failed, "the Go Thrift client failed:\n" + run.report()
    assert run.ok.get("unknown-service", "").startswith("UNKNOWN_METHOD"), run.report()
    assert UNKNOWN_SERVICE in run.ok["unknown-service"], run.report()
