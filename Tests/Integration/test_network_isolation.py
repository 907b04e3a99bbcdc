"""Network namespaces under attack: every instance has a network of its own (one veth link to apusd), reaches
nothing of the node but its own sidecar and apusd's instance API, and gets the egress its manifest names:
`network: {egress: all}` (the default) reaches the outside world, `mesh` only its sidecar, `none` nothing.

The attacks run from functions/escapist (?attack=connect / ?attack=net). "The outside world" is a network
namespace this module creates: a veth link from the host (198.51.100.1/24) to a namespace (198.51.100.2) running a
plain HTTP server, standing for a server on the internet. Needs root, bubblewrap, `ip` and `nft` (apusd reports
`netns=on` in /v1/info's sandboxLayers); skips otherwise, except the manifest checks, which run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from apus_testlib import FUNCTIONS_DIR, Apusd, copy_function

ESCAPIST = FUNCTIONS_DIR / "escapist"
OUTSIDE_HOST_SIDE = "198.51.100.1"
OUTSIDE_SERVER = "198.51.100.2"
OUTSIDE_MARKER = "the outside world"
METADATA = "169.254.169.254"
SIDECAR_PORT = 15001
INSTANCE_API_PORT = 15002

UNREACHABLE = {"timeout", "ENETUNREACH", "EHOSTUNREACH", "ECONNREFUSED"}


@pytest.fixture(scope="module")
def isolated(apusd):
    layers = apusd.info.get("sandboxLayers") or {}
    if not layers.get("network"):
        pytest.skip(f"apusd reports no network namespaces (sandboxLayers={layers}); they need root, bubblewrap, "
                    "ip and nft")
    return apusd


@pytest.fixture(scope="module")
def outside_world():
    """A namespace standing for the internet: an HTTP server at 198.51.100.2:80 behind a veth from the host."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("creating the outside-world namespace needs root and ip")
    name = f"apustest-out-{os.getpid()}"
    link = f"apto{os.getpid() % 100000}"
    root = Path(f"/tmp/{name}")
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text(OUTSIDE_MARKER)

    def ip(*args, check=True):
        return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)

    ip("netns", "add", name)
    server = None
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("addr", "add", f"{OUTSIDE_HOST_SIDE}/24", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", name, "addr", "add", f"{OUTSIDE_SERVER}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", name, "/usr/bin/python3", "-m", "http.server", "--bind",
                                   OUTSIDE_SERVER, "--directory", str(root), "80"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run(["curl", "-s", "--max-time", "1", f"http://{OUTSIDE_SERVER}/"], capture_output=True, text=True)
            if OUTSIDE_MARKER in probe.stdout:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the outside-world server did not come up")
        yield OUTSIDE_SERVER
    finally:
        if server:
            server.kill()
            server.wait()
        ip("netns", "delete", name, check=False)
        ip("link", "delete", link, check=False)
        shutil.rmtree(root, ignore_errors=True)


def variant(deployed, name: str, manifest: str) -> str:
    dst = deployed.scratch / name
    if not dst.exists():
        copy_function(ESCAPIST, dst, name=name, subs=[(r"^concurrency:.*$", f"concurrency: 4\n{manifest}")])
    return deployed(dst)


@pytest.fixture(scope="module")
def escapist(isolated, deployed):
    return deployed(ESCAPIST)


def attack(apusd, name: str, kind: str, **params) -> dict:
    query = urllib.parse.urlencode({"attack": kind, **params})
    r = apusd.get(f"/{name}/?{query}", timeout=30)
    assert r.status == 200, f"?attack={kind} {params} on {name}: {r!r}"
    return r.json()


def connect(apusd, name: str, host: str, port: int, **params) -> dict:
    return attack(apusd, name, "connect", host=host, port=port, **params)


def assert_unreachable(doc: dict, what: str):
    assert doc["connected"] is False and doc["errno"] in UNREACHABLE, f"{what} was reachable: {doc}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def instances(apusd, name: str) -> list[dict]:
    return apusd.api_json("GET", f"/v1/functions/{name}/instances")["instances"]


def test_instance_sees_only_its_own_network(isolated, escapist):
    net = attack(isolated, escapist, "net")
    assert sorted(net["interfaces"]) == ["eth0", "lo"], net
    # Only the instance's own socket listens in its namespace: none of apusd's ports (API, gateway, Thrift) and no
    # other instance's show in its /proc/net/tcp.
    assert net["listeningPorts"] == [net["apusPort"]], net
    for port in (port_of(isolated.api), port_of(isolated.gateway)):
        assert port not in net["listeningPorts"], net
    address = instances(isolated, escapist)[0]["address"]
    assert address.startswith("10.213."), f"instance address {address!r} is not in the instance range"
    assert net["defaultGateway"] is not None, f"egress: all must have a default route: {net}"


def test_instance_cannot_reach_apusd_the_node_or_metadata(isolated, escapist, outside_world):
    api_port, gateway_port = port_of(isolated.api), port_of(isolated.gateway)
    net = attack(isolated, escapist, "net")
    node_link = net["defaultGateway"]  # apusd's end of the instance's link
    # 127.0.0.1 is the instance's own loopback: nothing of apusd listens there.
    assert_unreachable(connect(isolated, escapist, "127.0.0.1", api_port), "the control API on 127.0.0.1")
    assert_unreachable(connect(isolated, escapist, "127.0.0.1", gateway_port), "the gateway on 127.0.0.1")
    # The node's addresses, reached through the link (dropped by apusd's nftables table).
    for host in (node_link, OUTSIDE_HOST_SIDE):
        for port in (api_port, gateway_port, 22):
            assert_unreachable(connect(isolated, escapist, host, port), f"the node at {host}:{port}")
    # Nor the node's own sidecar port on a link that is not the instance's (it has no sidecar: nothing there).
    assert_unreachable(connect(isolated, escapist, node_link, SIDECAR_PORT), "a sidecar port without a sidecar")
    assert_unreachable(connect(isolated, escapist, METADATA, 80), "the link-local metadata address")
    # The instance survives every attempt.
    r = isolated.get(f"/{escapist}/", timeout=30)
    assert r.status == 200 and r.json()["ok"] is True, r


def test_instance_api_serves_only_task_progress(isolated, escapist):
    first = instances(isolated, escapist)[0]["address"]
    a, b, c, d = (int(x) for x in first.split("."))
    block_base = ((a << 24) | (b << 16) | (c << 8) | d) & ~0xFFF
    services = f"{block_base >> 24}.{(block_base >> 16) & 255}.{(block_base >> 8) & 255}.{(block_base & 255) + 1}"
    doc = connect(isolated, escapist, services, INSTANCE_API_PORT, path="/v1/functions")
    assert doc["connected"] is True, f"the instance API at {services}:{INSTANCE_API_PORT} is not reachable: {doc}"
    assert " 404 " in doc["reply"] + " ", f"the instance API served a control route: {doc}"
    doc = connect(isolated, escapist, services, INSTANCE_API_PORT, path="/v1/info")
    assert " 404 " in doc["reply"] + " ", f"the instance API served /v1/info: {doc}"
    # A progress post needs its task's capability: none, or another task's, is refused.
    for path in ("/v1/tasks/t-nosuchtask/progress", "/v1/tasks/t-nosuchtask/progress?capability=forged"):
        doc = connect(isolated, escapist, services, INSTANCE_API_PORT, method="POST", path=path, body='{"progress": 0.5}')
        assert " 403 " in doc["reply"] + " ", f"POST {path} on the instance API: {doc}"
    # Only that port of that address.
    assert_unreachable(connect(isolated, escapist, services, port_of(isolated.api)), "the control API port on the instance API address")


def test_instance_cannot_reach_another_instance(isolated, escapist, deployed):
    peer = variant(deployed, "escapist-peer", "")
    r = isolated.get(f"/{peer}/", timeout=30)
    assert r.status == 200, r
    target = instances(isolated, peer)[0]
    own = instances(isolated, escapist)[0]
    assert target["address"] != own["address"]
    assert_unreachable(connect(isolated, escapist, target["address"], target["port"]),
                       f"another function's instance at {target['address']}:{target['port']}")
    # apusd itself still reaches both.
    assert isolated.get(f"/{peer}/", timeout=30).status == 200


def test_egress_all_reaches_the_outside_world(isolated, escapist, outside_world):
    doc = connect(isolated, escapist, outside_world, 80)
    assert doc["connected"] is True and " 200 " in doc["reply"] + " ", doc
    assert OUTSIDE_MARKER in doc["body"], doc


def test_egress_none_reaches_nothing(isolated, deployed, outside_world):
    name = variant(deployed, "escapist-egress-none", "network: {egress: none}")
    net = attack(isolated, name, "net")
    assert net["defaultGateway"] is None, f"egress: none must have no default route: {net}"
    assert net["sidecar"] is None, net
    assert_unreachable(connect(isolated, name, outside_world, 80), "the outside world with egress: none")
    assert_unreachable(connect(isolated, name, METADATA, 80), "metadata with egress: none")
    link_gateway = next(r["destination"] for r in net["routes"] if r["mask"] == "255.255.255.252")
    node_link = link_gateway[: link_gateway.rfind(".") + 1] + str(int(link_gateway.rsplit(".", 1)[1]) + 1)
    assert_unreachable(connect(isolated, name, node_link, SIDECAR_PORT), "the sidecar port with egress: none")
    assert_unreachable(connect(isolated, name, node_link, port_of(isolated.api)), "the node with egress: none")
    r = isolated.get(f"/{name}/", timeout=30)
    assert r.status == 200 and r.json()["ok"] is True, r


def test_egress_mesh_reaches_only_its_sidecar(isolated, deployed, outside_world):
    name = variant(deployed, "escapist-egress-mesh",
                   "mesh: {service: escapist-mesh.test, sidecar: true}\nnetwork: {egress: mesh}")
    net = attack(isolated, name, "net")
    assert net["defaultGateway"] is None, f"egress: mesh must have no default route: {net}"
    sidecar = net["sidecar"]
    assert sidecar and sidecar.endswith(f":{SIDECAR_PORT}") and "127.0.0.1" not in sidecar, net
    sidecar_host = sidecar.split("//", 1)[1].rsplit(":", 1)[0]
    assert_unreachable(connect(isolated, name, outside_world, 80), "the outside world with egress: mesh")
    assert_unreachable(connect(isolated, name, sidecar_host, port_of(isolated.api)), "the node with egress: mesh")
    # The sidecar is reachable, and through it the mesh: the function calls its own service by name.
    doc = connect(isolated, name, sidecar_host, SIDECAR_PORT, hostHeader="escapist-mesh.test", path="/")
    assert doc["connected"] is True, doc
    assert " 200 " in doc["reply"] + " " and json.loads(doc["body"]).get("ok") is True, f"a mesh call through the sidecar failed: {doc}"


def test_sidecar_of_egress_all_function_is_on_its_link(isolated, deployed):
    name = variant(deployed, "escapist-mesh-all", "mesh: {service: escapist-all.test, sidecar: true}")
    net = attack(isolated, name, "net")
    assert net["defaultGateway"] is not None
    assert net["sidecar"] == f"http://{net['defaultGateway']}:{SIDECAR_PORT}", net
    doc = connect(isolated, name, net["defaultGateway"], SIDECAR_PORT, hostHeader="escapist-all.test", path="/")
    assert " 200 " in doc["reply"] + " ", doc


def test_namespaces_and_rules_are_removed_when_apusd_stops(tmp_path):
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft")
    daemon = Apusd(tmp_path / "apusd")
    try:
        daemon.start()
        if not (daemon.info.get("sandboxLayers") or {}).get("network"):
            pytest.skip("no network namespaces on this host")
        daemon.deploy(ESCAPIST)
        name = "escapist"
        assert daemon.get(f"/{name}/", timeout=30).status == 200
        address = daemon.api_json("GET", f"/v1/functions/{name}/instances")["instances"][0]["address"]
        c, d = (int(x) for x in address.split(".")[2:])
        block = ((c << 8) | d) >> 12
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"apus-{block}-" in namespaces
        assert daemon.stop() == 0
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"apus-{block}-" not in namespaces, f"namespaces of block {block} left after apusd stopped:\n{namespaces}"
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert f"apus_b{block}\n" not in tables + "\n", tables
    finally:
        daemon.teardown()


@pytest.mark.parametrize("network, message", [
    ("network: {egress: everything}", "network.egress: must be one of all, mesh, none"),
    ("network: {egress: mesh}", "network.egress: mesh reaches only the function's sidecar"),
    ("network: {ingress: all}", "network"),
])
def test_deploy_refuses_bad_network_settings(apusd, tmp_path, network, message):
    dst = copy_function(ESCAPIST, tmp_path / "bad-network", name="bad-network",
                        subs=[(r"^concurrency:.*$", f"concurrency: 4\n{network}")])
    rc, stdout, stderr = apusd.cli("deploy", str(dst))
    assert rc != 0, stdout
    assert message in stdout + stderr, stdout + stderr
