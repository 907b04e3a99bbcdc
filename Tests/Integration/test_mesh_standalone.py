"""A service that is not a function joins the mesh with a standalone `apus-sidecar` (how a PaaS service migrates):
its sidecar registers it in the registry — apusd's embedded one, or etcd — reports its health, and deregisters
on SIGTERM; a second sidecar beside a caller resolves it by name through the same registry and calls it. Run once
against each registry.
"""

from __future__ import annotations

import json
import signal

import pytest

from apus_testlib import Apusd
from registry_support import Etcd, resolve, wait_until
from sidecar_support import Backend, Sidecar, get_json

SERVICE = "legacy.orders"


@pytest.fixture(params=["embedded", "etcd"])
def registry(request, tmp_path):
    """(registry URL for sidecars, apusd serving the registry API, etcd or None)."""
    etcd = None
    if request.param == "etcd":
        etcd = Etcd(tmp_path / "etcd")
        etcd.start()
    daemon = Apusd(tmp_path / "apusd", extra_args=("--registry", etcd.registry_url) if etcd else ())
    try:
        daemon.start()
        yield (etcd.registry_url if etcd else daemon.api), daemon, etcd
    finally:
        daemon.teardown()
        if etcd:
            etcd.stop()


def registered(daemon) -> list[dict]:
    return resolve(daemon, SERVICE).get("endpoints", [])


@pytest.mark.timeout(120)
def test_standalone_sidecar_registers_its_service_and_a_caller_reaches_it_by_name(registry, tmp_path):
    url, daemon, _ = registry
    app = Backend("http", "orders-app").start()
    (tmp_path / "front").mkdir()
    (tmp_path / "caller").mkdir()
    front = Sidecar(tmp_path / "front", {"inbound": {"health_check": {"kind": "tcp", "interval": "200ms"}}},
                    registry=url,
                    args=["--inbound-port", "0", "--app-port", str(app.port), "--app-protocol", "http",
                          "--service", SERVICE, "--instance-id", "orders-1"])
    caller = Sidecar(tmp_path / "caller", {}, registry=url)
    try:
        front.start()
        # Registered under its name with the inbound port, healthy once its health check passed.
        wait_until(lambda: any(e["id"] == "orders-1" and e["healthy"] for e in registered(daemon)), 15,
                   f"{SERVICE} never showed up healthy in the registry")
        endpoint = next(e for e in registered(daemon) if e["id"] == "orders-1")
        assert (endpoint["port"], endpoint["protocol"]) == (front.inbound, "http"), endpoint
        out = daemon.cli_ok("services", "resolve", SERVICE)
        assert "orders-1" in out, out

        # A caller's sidecar resolves the name through the same registry and reaches the app via the inbound port.
        caller.start()
        status, body = get_json(caller.outbound, "/orders/7", SERVICE)
        assert status == 200 and body["server"] == "orders-app" and body["path"] == "/orders/7", body

        # SIGTERM: deregistered at once (not left to expire).
        front.signal(signal.SIGTERM)
        front.proc.wait(20)
        wait_until(lambda: not any(e["id"] == "orders-1" for e in registered(daemon)), 5,
                   f"{SERVICE} still registered after its sidecar stopped")
    finally:
        caller.stop()
        front.stop()
        app.kill()
