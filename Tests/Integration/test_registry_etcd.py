"""The service registry on a real etcd (`apusd --registry etcd://…`): registrations through the API land in etcd
as leased keys (cross-checked through etcd's own JSON API), heartbeats, expiry and deregistration act on the
leases, entries written straight into etcd show through the API and its watches, a function is resolved by its
mesh name straight from etcd and called over HTTP and gRPC, and an etcd restart that loses every key and lease
gets the function registered again.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from apus_testlib import Apusd
from registry_support import (Etcd, call_grpc_endpoint, call_http_endpoint, endpoint_ids, heartbeat, long_poll,
                              mesh_grpc_echo, mesh_headecho, register, registry_put, resolve, wait_until)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    e = Etcd(tmp_path_factory.mktemp("etcd"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="module")
def daemon(etcd, tmp_path_factory):
    d = Apusd(tmp_path_factory.mktemp("apusd-etcd"), extra_args=("--registry", etcd.registry_url))
    try:
        d.start()
        yield d
    finally:
        d.teardown()


def test_registrations_are_leased_keys_in_etcd(daemon, etcd):
    lease = register(daemon, "etcd.lifecycle", "a", port=7501, ttl=3, zone="z2", metadata={"k": "v"})
    stored = etcd.service("etcd.lifecycle")
    assert list(stored) == ["a"], stored
    value, lease_id = stored["a"]
    assert value == {"id": "a", "address": "127.0.0.1", "port": 7501, "protocol": "http", "weight": 100,
                     "zone": "z2", "metadata": {"k": "v"}, "healthy": True}, value
    assert lease_id == lease["leaseID"] and 0 < etcd.lease_ttl(lease_id) <= 3

    # The API's view carries the lease's time left.
    ep = resolve(daemon, "etcd.lifecycle")["endpoints"][0]
    assert ep["leaseID"] == lease["leaseID"] and ep["ttlSeconds"] == 3 and 0 <= ep["expiresInSeconds"] <= 3, ep

    # Heartbeats keep it past its TTL; health is written through to the key.
    for _ in range(4):
        time.sleep(1)
        assert heartbeat(daemon, lease).status == 200
    assert list(etcd.service("etcd.lifecycle")) == ["a"]
    r = daemon.api_call("PUT", f"/v1/registry/leases/{lease['leaseID']}/health", {"healthy": False})
    assert r.status == 200, r
    assert etcd.service("etcd.lifecycle")["a"][0]["healthy"] is False

    # Deregistration revokes the lease: key gone, heartbeat refused.
    r = daemon.api_call("DELETE", f"/v1/registry/services/etcd.lifecycle/endpoints/a?lease={lease['leaseID']}")
    assert r.status == 204, r
    assert etcd.service("etcd.lifecycle") == {}
    assert etcd.lease_ttl(lease["leaseID"]) == -1
    assert heartbeat(daemon, lease).status == 404


def test_expiry_removes_the_key(daemon, etcd):
    register(daemon, "etcd.expiry", "short", port=7502, ttl=1)
    assert list(etcd.service("etcd.expiry")) == ["short"]
    wait_until(lambda: etcd.service("etcd.expiry") == {}, 5, "etcd kept the key past its lease")
    assert endpoint_ids(daemon, "etcd.expiry") == []


def test_entries_written_to_etcd_show_through_the_api_and_its_watch(daemon, etcd):
    snap = resolve(daemon, "etcd.watch")
    results = {}

    def poll():
        results["changed"] = long_poll(daemon, "etcd.watch", snap["index"])

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    lease = etcd.grant(30)
    etcd.put("/apus/services/etcd.watch/ext-1",
             {"id": "ext-1", "address": "10.1.2.3", "port": 9000, "protocol": "grpc", "weight": 10,
              "metadata": {}, "healthy": True}, lease=lease)
    t.join(15)
    changed, elapsed = results["changed"]
    assert [(e["id"], e["address"], e["port"], e["protocol"], e["weight"]) for e in changed["endpoints"]] == \
        [("ext-1", "10.1.2.3", 9000, "grpc", 10)], changed
    assert elapsed < 5, elapsed
    # The entry is the registrant's (its lease); the API can renew and remove it like any other.
    ep = resolve(daemon, "etcd.watch")["endpoints"][0]
    assert ep["leaseID"] == lease
    renewed = heartbeat(daemon, {"leaseID": lease})
    assert renewed.status == 200 and renewed.json() == {"service": "etcd.watch", "endpointID": "ext-1", "leaseID": lease,
                                                          "ttlSeconds": 30}, renewed
    gone = {}
    t = threading.Thread(target=lambda: gone.setdefault("r", long_poll(daemon, "etcd.watch", changed["index"])))
    t.start()
    time.sleep(0.3)
    assert daemon.api_call("DELETE", "/v1/registry/services/etcd.watch/endpoints/ext-1").status == 204
    t.join(15)
    assert gone["r"][0]["endpoints"] == [], gone


def test_bad_registration_is_refused_before_etcd(daemon, etcd):
    r = registry_put(daemon, "etcd.bad", "a", {"address": "127.0.0.1", "port": 70000, "protocol": "http"})
    assert r.status == 400 and r.json()["error"]["message"].startswith("endpoint.port:"), r
    assert etcd.service("etcd.bad") == {}


def test_function_resolved_from_etcd_and_kept_through_an_etcd_restart(daemon, etcd, tmp_path):
    daemon.deploy(mesh_headecho(tmp_path / "http", "etcd-http", "pay.refund"))
    daemon.deploy(mesh_grpc_echo(tmp_path / "grpc", "etcd-grpc", "pay.echo"))

    # An upstream that reads etcd directly finds the gateway's endpoint and calls the function over it.
    http_stored = wait_until(lambda: etcd.service("pay.refund"), 10, "HTTP function not in etcd")
    (http_ep, _), = http_stored.values()
    assert (http_ep["address"], http_ep["port"], http_ep["protocol"], http_ep["metadata"]) == \
        ("127.0.0.1", daemon.http_port, "http", {"function": "etcd-http"})
    r = call_http_endpoint(http_ep, "pay.refund", "/refund/42")
    assert r.status == 200 and r.json()["path"] == "/refund/42", r
    grpc_stored = wait_until(lambda: etcd.service("pay.echo"), 10, "gRPC function not in etcd")
    (grpc_ep, _), = grpc_stored.values()
    assert grpc_ep["protocol"] == "grpc" and grpc_ep["port"] == daemon.http_port
    assert call_grpc_endpoint(grpc_ep, "via etcd") == "via etcd"
    # The same through apusd's API.
    assert [e["id"] for e in resolve(daemon, "pay.refund")["endpoints"]] == [http_ep["id"]]

    # etcd restarts having lost every key and lease: apusd's heartbeats find the lease gone and register again.
    etcd.restart(wipe=True)
    assert etcd.service("pay.refund") == {}
    restored = wait_until(lambda: etcd.service("pay.refund"), 15, "registration not restored after the etcd restart")
    assert list(restored.values())[0][0] == http_ep
    wait_until(lambda: etcd.service("pay.echo"), 15, "gRPC registration not restored after the etcd restart")
    assert call_http_endpoint(list(restored.values())[0][0], "pay.refund").status == 200

    # A plain restart (data kept) keeps the entries, and the API's watches carry on.
    etcd.restart(wipe=False)
    assert list(etcd.service("pay.refund")) == [http_ep["id"]]
    snap = wait_until(lambda: resolve(daemon, "pay.refund") if daemon.api_call("GET", "/v1/registry/services/pay.refund").status == 200 else None,
                      10, "API did not reach etcd again")
    assert [e["id"] for e in snap["endpoints"]] == [http_ep["id"]]

    # Deleting the function removes its key.
    daemon.cli_ok("delete", "etcd-http")
    wait_until(lambda: etcd.service("pay.refund") == {}, 10, "key outlived the function")

    # apusd stopping deregisters its functions at once; started again, it registers them again.
    assert daemon.stop() == 0
    assert etcd.service("pay.echo") == {}
    daemon.start()
    again = wait_until(lambda: etcd.service("pay.echo"), 10, "not registered again after the apusd restart")
    (grpc_again, _), = again.values()
    assert grpc_again["port"] == daemon.http_port
    assert call_grpc_endpoint(grpc_again, "after restart") == "after restart"
