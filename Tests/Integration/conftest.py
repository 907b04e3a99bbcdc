"""Fixtures for the Apus integration tests.

`apusd`       session-scoped daemon shared by most tests (its functions stay deployed across tests).
`fresh_apusd` function-scoped daemon for tests that stop/restart it.
`deployed`    session helper: deploy a function dir into the session daemon once, return its name.
`tls_apusd`   session-scoped daemon with a TLS port too (self-signed cert for localhost/127.0.0.1 in
              `tls_apusd.cert_path`); started only by the tests that use it.

The binaries come from $APUS_BIN_DIR (default <repo>/.build/debug). apusd's stdout/stderr go to
<tmp>/apusd.log; the tail of every daemon a failing test used is attached to the failure report.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from apus_testlib import EXAMPLES_DIR, FUNCTIONS_DIR, Apusd, make_self_signed_cert, manifest_name, write_headecho

DEFAULT_TEST_TIMEOUT = 90  # seconds; override with @pytest.mark.timeout(N)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    daemons = getattr(item, "funcargs", {}) or {}
    seen = set()
    for value in daemons.values():
        d = value if isinstance(value, Apusd) else getattr(value, "apusd", None)
        if isinstance(d, Apusd) and id(d) not in seen:
            seen.add(id(d))
            report.sections.append((f"apusd log tail ({d.log_path})", d.log_tail(80)))


@pytest.fixture(autouse=True)
def _time_limit(request):
    """Fail a test that runs too long (SIGALRM in the main thread; pytest-timeout is not available)."""
    marker = request.node.get_closest_marker("timeout")
    seconds = int(marker.args[0]) if marker else DEFAULT_TEST_TIMEOUT

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded its {seconds}s time limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def apusd(tmp_path_factory):
    daemon = Apusd(tmp_path_factory.mktemp("apusd-session"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.teardown()


@pytest.fixture(scope="session")
def tls_apusd(tmp_path_factory):
    work = tmp_path_factory.mktemp("apusd-tls")
    cert, key = make_self_signed_cert(work / "cert")
    daemon = Apusd(work / "apusd", extra_args=("--tls-port", "0", "--tls-cert", str(cert), "--tls-key", str(key)))
    daemon.cert_path = cert
    try:
        daemon.start()
        assert daemon.tls_port, f"apusd started with --tls-port 0 wrote no \"tls\" port to ports.json:\n{daemon.log_tail()}"
        yield daemon
    finally:
        daemon.teardown()


@pytest.fixture
def fresh_apusd(tmp_path):
    daemon = Apusd(tmp_path / "apusd")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.teardown()


class Deployer:
    """Deploys function dirs into the session daemon once each."""

    def __init__(self, apusd: Apusd, scratch: Path):
        self.apusd = apusd
        self.scratch = scratch
        self.done: dict[str, Path] = {}
        self.outputs: dict[str, str] = {}  # what `apus deploy` printed

    def __call__(self, func_dir: Path) -> str:
        name = manifest_name(func_dir)
        if name not in self.done:
            self.outputs[name] = self.apusd.deploy(func_dir)
            self.done[name] = func_dir
        return name

    def fixture(self, name: str) -> str:
        """Deploy Tests/Integration/functions/<name>."""
        return self(FUNCTIONS_DIR / name)

    def example(self, name: str) -> str:
        """Deploy Examples/<name>."""
        return self(EXAMPLES_DIR / name)

    def headecho(self) -> str:
        """Deploy the tests' own header-echo command function (written to a temp dir)."""
        return self(write_headecho(self.scratch / "headecho"))


@pytest.fixture(scope="session")
def deployed(apusd, tmp_path_factory):
    return Deployer(apusd, tmp_path_factory.mktemp("functions"))
