"""The service registry with apusd's embedded registry (the default): the /v1/registry API (register, heartbeat,
health, expiry, deregistration, long-poll watches, bad input), `apus services`, the registry metrics, functions
with `mesh.service` registered in discovery and called at the resolved endpoint over HTTP and gRPC, re-registration
after an apusd restart, and mesh manifest validation.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from apus_testlib import Apusd, tar_gz_dir
from registry_support import (call_grpc_endpoint, call_http_endpoint, endpoint_ids, heartbeat, long_poll,
                              mesh_grpc_echo, mesh_headecho, register, registry_put, resolve, wait_until)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Apusd(tmp_path_factory.mktemp("apusd-registry"))
    try:
        d.start()
        yield d
    finally:
        d.teardown()


def test_register_heartbeat_expire_deregister(daemon):
    a = register(daemon, "reg.lifecycle", "a", port=7001, ttl=2, zone="z1", weight=50, metadata={"k": "v"})
    b = register(daemon, "reg.lifecycle", "b", port=7002, ttl=1)
    snap = resolve(daemon, "reg.lifecycle")
    assert [e["id"] for e in snap["endpoints"]] == ["a", "b"]
    first = snap["endpoints"][0]
    assert (first["address"], first["port"], first["protocol"], first["weight"], first["zone"], first["metadata"],
            first["healthy"], first["leaseID"], first["ttlSeconds"]) == \
        ("127.0.0.1", 7001, "http", 50, "z1", {"k": "v"}, True, a["leaseID"], 2)
    assert 0 < first["expiresInSeconds"] <= 2

    # a is kept alive by heartbeats past its TTL; b, left alone, expires after its 1 s.
    for _ in range(5):
        time.sleep(0.6)
        r = heartbeat(daemon, a)
        assert r.status == 200 and r.json()["leaseID"] == a["leaseID"], r
    assert endpoint_ids(daemon, "reg.lifecycle") == ["a"]
    r = heartbeat(daemon, b)
    assert r.status == 404 and r.json()["error"]["code"] == "not_found", r

    # Health: stays registered, flagged unhealthy.
    r = daemon.api_call("PUT", f"/v1/registry/leases/{a['leaseID']}/health", {"healthy": False})
    assert r.status == 200, r
    assert resolve(daemon, "reg.lifecycle")["endpoints"][0]["healthy"] is False

    # Deregistration: with a stale lease refused, with the current one done; the lease is then gone.
    r = daemon.api_call("DELETE", "/v1/registry/services/reg.lifecycle/endpoints/a?lease=nosuch")
    assert r.status == 404, r
    r = daemon.api_call("DELETE", f"/v1/registry/services/reg.lifecycle/endpoints/a?lease={a['leaseID']}")
    assert r.status == 204, r
    assert endpoint_ids(daemon, "reg.lifecycle") == []
    assert heartbeat(daemon, a).status == 404
    r = daemon.api_call("DELETE", "/v1/registry/services/reg.lifecycle/endpoints/a")
    assert r.status == 404, r


def test_reregistering_replaces_the_entry_and_its_lease(daemon):
    old = register(daemon, "reg.replace", "x", port=7100)
    new = register(daemon, "reg.replace", "x", port=7200, ttl=5)
    assert new["leaseID"] != old["leaseID"]
    assert [(e["id"], e["port"]) for e in resolve(daemon, "reg.replace")["endpoints"]] == [("x", 7200)]
    assert heartbeat(daemon, old).status == 404
    assert heartbeat(daemon, new).status == 200


def test_watch_long_poll_delivers_changes(daemon):
    snap = resolve(daemon, "reg.watch")
    assert snap["endpoints"] == []
    results = {}

    def poll():
        results["first"] = long_poll(daemon, "reg.watch", snap["index"])

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    lease = register(daemon, "reg.watch", "w1", port=7300, ttl=1)
    t.join(15)
    changed, elapsed = results["first"]
    assert [e["id"] for e in changed["endpoints"]] == ["w1"] and changed["index"] != snap["index"], changed
    assert elapsed < 5, f"the watch answered {elapsed:.1f}s after it was asked, not at the change"

    # Nothing changes: the poll answers the same snapshot after its wait.
    same, elapsed = long_poll(daemon, "reg.watch", changed["index"], wait="500ms")
    assert same["index"] == changed["index"] and 0.4 <= elapsed < 3, (same, elapsed)

    # Expiry is a change too: the poll answers when the 1 s lease runs out.
    gone, elapsed = long_poll(daemon, "reg.watch", changed["index"])
    assert gone["endpoints"] == [] and elapsed < 5, (gone, elapsed)
    assert heartbeat(daemon, lease).status == 404


def test_bad_registrations_are_refused_naming_the_field(daemon):
    good = {"address": "127.0.0.1", "port": 7000, "protocol": "http", "ttlSeconds": 5}
    cases = [
        ("Bad_Service", "a", good, "service:"),
        ("10.0.0.1", "a", good, "service:"),
        ("reg.bad", "a%20b", good, "endpoint.id:"),
        ("reg.bad", "a", {**good, "port": 0}, "endpoint.port:"),
        ("reg.bad", "a", {**good, "port": "80"}, "port: must be a whole number"),
        ("reg.bad", "a", {**good, "protocol": "smtp"}, "endpoint.protocol:"),
        ("reg.bad", "a", {**good, "ttlSeconds": 0}, "ttlSeconds:"),
        ("reg.bad", "a", {**good, "ttlSeconds": 99999}, "ttlSeconds:"),
        ("reg.bad", "a", {**good, "weight": -1}, "endpoint.weight:"),
        ("reg.bad", "a", {**good, "healthy": "yes"}, "healthy: must be true or false"),
        ("reg.bad", "a", {**good, "metadata": {"k": 1}}, "metadata.k:"),
        ("reg.bad", "a", {**good, "colour": "red"}, "colour: unknown key"),
        ("reg.bad", "a", {**good, "id": "b"}, "id:"),
        ("reg.bad", "a", {"port": 1, "protocol": "http"}, "address: is required"),
        ("reg.bad", "a", {"address": "h", "protocol": "http"}, "port: is required"),
    ]
    for service, endpoint_id, body, needle in cases:
        r = registry_put(daemon, service, endpoint_id, body)
        assert r.status == 400, (service, endpoint_id, body, r)
        err = r.json()["error"]
        assert err["code"] == "bad_request" and needle in err["message"], (needle, err)
    r = daemon.api_call("PUT", "/v1/registry/services/reg.bad/endpoints/a", b"not json")
    assert r.status == 400 and "JSON object" in r.json()["error"]["message"], r
    assert endpoint_ids(daemon, "reg.bad") == []

    r = daemon.api_call("POST", "/v1/registry/leases/nosuch/heartbeat")
    assert r.status == 404 and "nosuch" in r.json()["error"]["message"], r
    r = daemon.api_call("PUT", "/v1/registry/leases/nosuch/health", {"healthy": True})
    assert r.status == 404, r
    r = daemon.api_call("PUT", "/v1/registry/leases/nosuch/health", {"healthy": "no"})
    assert r.status == 400 and "healthy" in r.json()["error"]["message"], r
    r = daemon.api_call("GET", "/v1/registry/services/Bad_Name")
    assert r.status == 400 and r.json()["error"]["message"].startswith("service:"), r
    r = daemon.api_call("GET", "/v1/registry/services/reg.bad?watch=true")
    assert r.status == 400 and "index" in r.json()["error"]["message"], r
    r = daemon.api_call("GET", "/v1/registry/services/reg.bad?watch=true&index=0&wait=forever")
    assert r.status == 400 and "wait" in r.json()["error"]["message"], r


def test_cli_services_and_resolve(daemon):
    register(daemon, "reg.cli", "one", port=7401, zone="eu-1", weight=30)
    out = daemon.cli_ok("services")
    header = out.splitlines()[0].split()
    assert header == ["SERVICE", "ENDPOINT", "ADDRESS", "PROTOCOL", "WEIGHT", "ZONE", "HEALTH", "EXPIRES-IN"], out
    row = next(line.split() for line in out.splitlines() if line.startswith("reg.cli "))
    assert row[:7] == ["reg.cli", "one", "127.0.0.1:7401", "http", "30", "eu-1", "healthy"], row
    assert row[7].endswith("s"), row
    listing = daemon.cli_json("services")
    assert "reg.cli" in [s["name"] for s in listing["services"]]

    out = daemon.cli_ok("services", "resolve", "reg.cli")
    assert "127.0.0.1:7401" in out, out
    doc = daemon.cli_json("services", "resolve", "reg.cli")
    assert [e["port"] for e in doc["endpoints"]] == [7401], doc
    rc, out, err = daemon.cli("services", "resolve", "reg.nothing")
    assert rc == 1 and "no endpoints registered for reg.nothing" in err, (rc, out, err)


def test_registry_metrics(daemon):
    register(daemon, "reg.metrics", "m1", ttl=1)
    register(daemon, "reg.metrics", "m2", ttl=30)
    wait_until(lambda: endpoint_ids(daemon, "reg.metrics") == ["m2"], 5, "m1 did not expire")
    text = daemon.api_call("GET", "/metrics").text

    def value(name):
        for line in text.splitlines():
            if line.startswith(name + "{") and 'service="reg.metrics"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} for reg.metrics not in /metrics")

    assert value("apus_registry_registrations_total") == 2
    assert value("apus_registry_expirations_total") == 1
    assert value("apus_registry_endpoints") == 1


def test_functions_in_discovery_http_and_grpc(daemon, tmp_path):
    daemon.deploy(mesh_headecho(tmp_path / "http", "mesh-http", "echo.http-mesh"))
    daemon.deploy(mesh_grpc_echo(tmp_path / "grpc", "mesh-grpc", "echo.grpc-mesh"))

    http_ep = wait_until(lambda: resolve(daemon, "echo.http-mesh")["endpoints"], 10, "HTTP function not registered")[0]
    assert (http_ep["id"], http_ep["address"], http_ep["port"], http_ep["protocol"], http_ep["metadata"]) == \
        (f"mesh-http@127.0.0.1:{daemon.http_port}", "127.0.0.1", daemon.http_port, "http", {"function": "mesh-http"})
    r = call_http_endpoint(http_ep, "echo.http-mesh", "/hello?x=1")
    assert r.status == 200, r
    seen = r.json()
    assert seen["path"] == "/hello?x=1" and seen["headers"]["x-apus-function"] == "mesh-http", seen

    grpc_ep = wait_until(lambda: resolve(daemon, "echo.grpc-mesh")["endpoints"], 10, "gRPC function not registered")[0]
    assert (grpc_ep["port"], grpc_ep["protocol"], grpc_ep["metadata"]) == (daemon.http_port, "grpc", {"function": "mesh-grpc"})
    assert call_grpc_endpoint(grpc_ep, "through the mesh") == "through the mesh"

    # A second function may not take the same mesh service.
    clash = mesh_headecho(tmp_path / "clash", "mesh-clash", "echo.http-mesh")
    r = daemon.api_call("POST", "/v1/functions", tar_gz_dir(clash), headers={"Content-Type": "application/gzip"})
    assert r.status == 409 and "echo.http-mesh" in r.json()["error"]["message"] and "mesh-http" in r.json()["error"]["message"], r

    # Deleting the function removes its registration.
    daemon.cli_ok("delete", "mesh-http")
    wait_until(lambda: resolve(daemon, "echo.http-mesh")["endpoints"] == [], 5, "registration outlived the function")
    r = call_http_endpoint(http_ep, "echo.http-mesh")
    assert r.status == 404, r


def test_mesh_manifest_validation(daemon, tmp_path):
    cases = [
        ("mesh: {service: Payments.Refund}", "apus.yaml: mesh.service: must be"),
        ("mesh: {service: payments., sidecar: true}", "apus.yaml: mesh.service: must be"),
        ("mesh: {sidecar: true}", "apus.yaml: mesh.service: is required"),
        ("mesh: {service: ok.name, sidecar: sometimes}", "apus.yaml: mesh.sidecar: must be true or false"),
        ("mesh: {service: ok.name, retries: 3}", "apus.yaml: mesh.retries: unknown key"),
        ("mesh: [ok.name]", "apus.yaml: mesh: must be a mapping"),
    ]
    for i, (line, needle) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "apus.yaml").write_text(f"name: badmesh{i}\nruntime: python3\n{line}\n")
        (d / "main.py").write_text("def handler(event, context):\n    return 'x'\n")
        r = daemon.api_call("POST", "/v1/functions", tar_gz_dir(d), headers={"Content-Type": "application/gzip"})
        assert r.status == 400 and needle in r.json()["error"]["message"], (line, r)


def test_apusd_restart_registers_functions_again(tmp_path):
    d = Apusd(tmp_path / "apusd")
    try:
        d.start()
        d.deploy(mesh_headecho(tmp_path / "fn", "mesh-restart", "restart.svc"))
        before = wait_until(lambda: resolve(d, "restart.svc")["endpoints"], 10, "not registered")[0]
        assert before["port"] == d.http_port
        assert d.stop() == 0
        d.start()
        after = wait_until(lambda: resolve(d, "restart.svc")["endpoints"], 10, "not registered again after restart")[0]
        assert after["port"] == d.http_port and after["id"] == f"mesh-restart@127.0.0.1:{d.http_port}", after
        assert call_http_endpoint(after, "restart.svc").status == 200
    finally:
        d.teardown()


def test_thrift_function_registered_on_the_thrift_port(daemon, tmp_path):
    from apus_testlib import EXAMPLES_DIR, copy_function
    from thrift_support import calculator_client
    fn = copy_function(EXAMPLES_DIR / "calculator-python-thrift", tmp_path / "calc", name="mesh-calc")
    with open(fn / "apus.yaml", "a") as f:
        f.write("mesh: {service: calc.mesh}\n")
    daemon.deploy(fn)
    ep = wait_until(lambda: resolve(daemon, "calc.mesh")["endpoints"], 10, "Thrift function not registered")[0]
    assert (ep["address"], ep["port"], ep["protocol"], ep["metadata"]) == \
        ("127.0.0.1", daemon.thrift_port, "thrift", {"function": "mesh-calc"}), ep
    # An upstream calls it at the resolved endpoint in Thrift, multiplexed by the service name.
    with calculator_client(ep["address"], ep["port"], multiplexed="Calculator") as calc:
        assert calc.add(20, 22) == 42
