"""The authenticated control plane against a real apusd: bearer tokens with scopes (401/403 with clear messages),
the admin token apusd makes on first start (0600) and the CLI picks up, `apus token create|list|revoke`, registry
endpoints owned by the token that registered them, sidecar tokens limited to their own service, task progress
capabilities, the cross-site checks of mutating calls (foreign Origin / Host, non-JSON bodies) and the audit log.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from apus_testlib import (APUS, Apusd, assert_error, http_request, make_self_signed_cert, tar_gz_dir, wait_for_log,
                          write_headecho)
from registry_support import wait_until


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Apusd(tmp_path_factory.mktemp("apusd-auth"))
    try:
        d.start()
        yield d
    finally:
        d.teardown()


def create_token(d: Apusd, name: str, *scopes: str, expires: str | None = None) -> str:
    body = {"name": name, "scopes": list(scopes)}
    if expires:
        body["expiresIn"] = expires
    r = d.api_call("POST", "/v1/tokens", body)
    assert r.status == 201, r
    doc = r.json()
    assert doc["token"]["name"] == name and doc["token"]["scopes"] == list(scopes), doc
    assert doc["secret"].startswith("apus_") and len(doc["secret"]) >= 5 + 43, doc
    return doc["secret"]


def assert_401(r, mentioning: str):
    error = assert_error(r, 401, "unauthenticated")
    assert r.header("WWW-Authenticate", "").startswith("Bearer"), r
    assert mentioning in error["message"], error


def assert_403(r, mentioning: str):
    error = assert_error(r, 403, "forbidden")
    assert mentioning in error["message"], error
    return error


def registration(port: int = 7000) -> dict:
    return {"address": "127.0.0.1", "port": port, "protocol": "http", "ttlSeconds": 30}


# --------------------------------------------------------------------------------------------------------------
# Tokens


def test_admin_token_file_is_private_and_made_once(daemon):
    path = daemon.admin_token_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert stat.S_IMODE(daemon.data_dir.stat().st_mode) == 0o700
    secret = daemon.admin_token
    assert re.fullmatch(r"apus_[A-Za-z0-9_-]{43}", secret), secret
    # Only its SHA-256 is in the store.
    assert secret.encode() not in (daemon.data_dir / "apus.db").read_bytes()
    listed = daemon.api_json("GET", "/v1/tokens")["tokens"]
    admin = next(t for t in listed if t["name"] == "admin")
    assert admin["scopes"] == ["admin"] and "secret" not in admin and "hash" not in admin, admin
    assert secret not in json.dumps(listed)


def test_restart_keeps_the_admin_token(tmp_path):
    d = Apusd(tmp_path / "apusd")
    try:
        d.start()
        first = d.admin_token
        d.restart()
        assert d.admin_token == first
        assert d.api_call("GET", "/v1/functions").status == 200
        assert [t["name"] for t in d.api_json("GET", "/v1/tokens")["tokens"]] == ["admin"]
    finally:
        d.teardown()


def test_no_token_is_401_everywhere_but_health(daemon):
    for method, path, body in [
        ("GET", "/v1/functions", None),
        ("GET", "/v1/info", None),
        ("GET", "/metrics", None),
        ("POST", "/v1/functions", b"\x1f\x8b"),
        ("DELETE", "/v1/functions/anything", None),
        ("PUT", "/v1/registry/services/svc.a/endpoints/e1", json.dumps(registration()).encode()),
        ("GET", "/v1/registry/services", None),
        ("GET", "/v1/tasks", None),
        ("GET", "/v1/tokens", None),
    ]:
        r = daemon.api_call(method, path, body=body, token=None)
        assert_401(r, "needs a bearer token")
    r = daemon.api_call("GET", "/healthz", token=None)
    assert r.status == 200 and r.json() == {"status": "ok"}, r


def test_wrong_revoked_and_expired_tokens_are_401(daemon):
    assert_401(daemon.api_call("GET", "/v1/functions", token="apus_" + "x" * 43), "not known")
    assert_401(daemon.api_call("GET", "/v1/functions", headers={"Authorization": "Basic YWRtaW46YWRtaW4="}), "needs a bearer token")

    revoked = create_token(daemon, "to-revoke", "read")
    assert daemon.api_call("GET", "/v1/functions", token=revoked).status == 200
    assert daemon.api_call("DELETE", "/v1/tokens/to-revoke").status == 204
    assert_401(daemon.api_call("GET", "/v1/functions", token=revoked), "not known")
    assert_error(daemon.api_call("DELETE", "/v1/tokens/to-revoke"), 404, "not_found")

    short = create_token(daemon, "short-lived", "read", expires="1s")
    time.sleep(1.5)
    assert_401(daemon.api_call("GET", "/v1/functions", token=short), "expired")
    listed = {t["name"]: t for t in daemon.api_json("GET", "/v1/tokens")["tokens"]}
    assert listed["short-lived"]["expired"] is True and listed["short-lived"]["expiresAt"], listed


def test_scopes_decide_what_a_token_may_do(daemon, tmp_path):
    reader = create_token(daemon, "reader", "read")
    deployer = create_token(daemon, "deployer", "deploy")
    archive = tar_gz_dir(write_headecho(tmp_path / "fn", name="auth-echo"))
    gzip = {"Content-Type": "application/gzip"}

    # read: every GET, nothing that changes state.
    assert daemon.api_call("GET", "/v1/functions", token=reader).status == 200
    assert daemon.api_call("GET", "/v1/info", token=reader).status == 200
    assert daemon.api_call("GET", "/metrics", token=reader).status == 200
    error = assert_403(daemon.api_call("POST", "/v1/functions", body=archive, headers=gzip, token=reader), "needs scope deploy")
    assert "reader" in error["message"], error
    assert_403(daemon.api_call("GET", "/v1/tokens", token=reader), "needs scope admin")

    # deploy: create, release, scale and delete functions; not tokens, not reading.
    r = daemon.api_call("POST", "/v1/functions", body=archive, headers=gzip, token=deployer)
    assert r.status == 201, r
    r = daemon.api_call("PUT", "/v1/functions/auth-echo/release", {"weights": [{"version": 1, "weight": 100}]}, token=deployer)
    assert r.status == 200, r
    assert daemon.api_call("PUT", "/v1/functions/auth-echo/scale", {"max": 2}, token=deployer).status == 200
    assert_403(daemon.api_call("GET", "/v1/functions", token=deployer), "needs scope read")
    assert_403(daemon.api_call("POST", "/v1/tokens", {"name": "x", "scopes": ["admin"]}, token=deployer), "needs scope admin")
    assert daemon.api_call("DELETE", "/v1/functions/auth-echo", token=deployer).status == 204

    # Bad token requests are refused naming the field.
    assert_error(daemon.api_call("POST", "/v1/tokens", {"name": "bad", "scopes": ["root"]}), 400, "bad_request")
    assert_error(daemon.api_call("POST", "/v1/tokens", {"name": "Bad Name", "scopes": ["read"]}), 400, "bad_request")
    assert_error(daemon.api_call("POST", "/v1/tokens", {"name": "reader", "scopes": ["read"]}), 409, "conflict")


def test_task_scopes(daemon, tmp_path):
    tasks = create_token(daemon, "tasker-token", "tasks")
    invoker = create_token(daemon, "invoker-token", "invoke")
    r = daemon.api_call("POST", "/v1/tasks", {"function": "no-such-function"}, token=tasks)
    assert_error(r, 404, "not_found")  # allowed; the function just does not exist
    assert daemon.api_call("GET", "/v1/tasks", token=tasks).status == 200
    assert_error(daemon.api_call("POST", "/v1/functions/no-such-function/tasks", body=b"x", token=invoker), 404, "not_found")
    assert daemon.api_call("GET", "/v1/info", token=invoker).status == 200
    assert_403(daemon.api_call("GET", "/v1/tasks", token=invoker), "needs scope one of tasks, read")
    assert_403(daemon.api_call("DELETE", "/v1/functions/x", token=tasks), "needs scope deploy")


def test_environment_values_are_shown_to_admin_only(daemon, tmp_path):
    fn = write_headecho(tmp_path / "fn", name="auth-env")
    with open(fn / "apus.yaml", "a") as f:
        f.write("env: {API_KEY: s3cret-value, MODE: prod}\n")
    daemon.deploy(fn)
    reader = create_token(daemon, "env-reader", "read")
    for path in ["/v1/functions/auth-env", "/v1/functions/auth-env/versions", "/v1/functions/auth-env/versions/1"]:
        as_reader = daemon.api_call("GET", path, token=reader)
        assert as_reader.status == 200 and "s3cret-value" not in as_reader.text, as_reader
        as_admin = daemon.api_call("GET", path)
        assert as_admin.status == 200 and "s3cret-value" in as_admin.text, as_admin
    version = daemon.api_call("GET", "/v1/functions/auth-env/versions/1", token=reader).json()
    assert version["manifest"]["env"] == {"API_KEY": "(redacted)", "MODE": "(redacted)"}, version
    # The instance still gets the real values.
    assert daemon.get("/auth-env/").status == 200


# --------------------------------------------------------------------------------------------------------------
# Cross-site requests and DNS rebinding


def test_foreign_origin_host_and_form_bodies_are_refused(daemon):
    body = json.dumps({"name": "csrf", "scopes": ["admin"]}).encode()
    json_type = {"Content-Type": "application/json"}
    r = daemon.api_call("POST", "/v1/tokens", body=body, headers={**json_type, "Origin": "http://evil.example"})
    assert_403(r, "Origin http://evil.example is not this API's own")
    r = daemon.api_call("POST", "/v1/tokens", body=body, headers={**json_type, "Origin": "null"})
    assert_403(r, "Origin null")
    r = daemon.api_call("POST", "/v1/tokens", body=body, headers={**json_type, "Host": "evil.example"})
    assert_403(r, "Host evil.example is not a name of this API")
    r = daemon.api_call("POST", "/v1/tokens", body=body, headers={"Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    for form in ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"]:
        assert_error(daemon.api_call("POST", "/v1/functions", body=b"\x1f\x8bxx", headers={"Content-Type": form}), 415,
                     "unsupported_media_type")
    # The API's own origin and names, and JSON, pass (the request reaches the handler).
    own = f"http://127.0.0.1:{daemon.api_port}"
    r = daemon.api_call("POST", "/v1/tokens", body=body, headers={**json_type, "Origin": own, "Host": f"127.0.0.1:{daemon.api_port}"})
    assert r.status == 201, r
    r = daemon.api_call("DELETE", "/v1/tokens/csrf", headers={"Host": f"localhost:{daemon.api_port}"})
    assert r.status == 204, r
    assert "csrf" not in [t["name"] for t in daemon.api_json("GET", "/v1/tokens")["tokens"]]
    # Reads are not state changes: a foreign Host on a GET still needs only the token.
    assert daemon.api_call("GET", "/v1/functions", headers={"Host": "whatever.example"}).status == 200


def test_allowed_host_flag_and_open_metrics(tmp_path):
    d = Apusd(tmp_path / "apusd", extra_args=("--api-allowed-host", "apus.internal", "--api-open-metrics"))
    try:
        d.start()
        r = http_request(d.api, "GET", "/metrics", token=None)
        assert r.status == 200 and r.header("Content-Type", "").startswith("text/plain"), r
        assert_401(d.api_call("GET", "/v1/info", token=None), "needs a bearer token")
        r = d.api_call("POST", "/v1/tokens", {"name": "via-name", "scopes": ["read"]}, headers={"Host": "apus.internal:7070"})
        assert r.status == 201, r
        assert_403(d.api_call("POST", "/v1/tokens", {"name": "x", "scopes": ["read"]}, headers={"Host": "apus.other"}), "Host")
    finally:
        d.teardown()


def test_api_host_apart_from_the_gateway_and_api_tls(tmp_path):
    cert, key = make_self_signed_cert(tmp_path / "cert")
    d = Apusd(tmp_path / "apusd", extra_args=("--host", "127.0.0.1", "--api-host", "0.0.0.0",
                                              "--api-tls-cert", str(cert), "--api-tls-key", str(key)))
    try:
        d.start()
        ports = json.loads((d.data_dir / "ports.json").read_text())
        # ports.json names the API as a client on this node reaches it (loopback for a wildcard address).
        assert (ports["host"], ports["apiHost"], ports["apiScheme"]) == ("127.0.0.1", "127.0.0.1", "https"), ports
        assert d.api == f"https://127.0.0.1:{d.api_port}"
        # Verified against the test's own certificate (its names: localhost, 127.0.0.1), by name.
        import ssl
        import urllib.request
        context = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(f"{d.api}/v1/functions", headers={"Authorization": f"Bearer {d.admin_token}"})
        with urllib.request.urlopen(req, context=context, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read()) == {"functions": []}
        # Not in plain HTTP.
        with pytest.raises((OSError, http.client.HTTPException)):
            http_request(f"http://127.0.0.1:{d.api_port}", "GET", "/healthz", timeout=5)
        r = d.api_call("GET", "/v1/info")
        assert r.status == 200 and r.json()["gateway"]["http"] == f"http://127.0.0.1:{d.http_port}", r
        # The CLI trusts the API's own certificate through APUS_CACERT (by name: localhost).
        os.environ["APUS_CACERT"] = str(cert)
        try:
            assert d.cli_ok("list", api=f"https://localhost:{d.api_port}", token=d.admin_token).strip() == "no functions"
        finally:
            del os.environ["APUS_CACERT"]
        rc, _, err = d.cli("list", api=f"https://localhost:{d.api_port}", token=d.admin_token)
        assert rc == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
    finally:
        d.teardown()


# --------------------------------------------------------------------------------------------------------------
# The registry


def test_registry_tokens_reach_their_own_service_and_endpoints_only(daemon):
    a1 = create_token(daemon, "svc-a-1", "registry:svc.a")
    a2 = create_token(daemon, "svc-a-2", "registry:svc.a")
    put = lambda token, service, id, port=7000: daemon.api_call(
        "PUT", f"/v1/registry/services/{service}/endpoints/{id}", registration(port), token=token)

    r = put(a1, "svc.a", "e1")
    assert r.status == 200, r
    lease = r.json()["leaseID"]
    # Not another service.
    assert_403(put(a1, "svc.b", "e1"), "needs scope registry:svc.b")
    assert_403(daemon.api_call("DELETE", "/v1/registry/services/svc.b/endpoints/x", token=a1), "registry:svc.b")
    # Resolving is allowed (a sidecar resolves its upstreams); the rest of the API is not.
    assert daemon.api_call("GET", "/v1/registry/services/svc.a", token=a1).status == 200
    assert_403(daemon.api_call("GET", "/v1/functions", token=a1), "needs scope read")

    # Another token of the same service cannot take over, renew or remove a1's endpoint.
    assert_403(put(a2, "svc.a", "e1", port=7666), "registered by another token")
    assert_403(daemon.api_call("DELETE", "/v1/registry/services/svc.a/endpoints/e1", token=a2), "registered by another token")
    assert_403(daemon.api_call("POST", f"/v1/registry/leases/{lease}/heartbeat", token=a2), "registered by another token")
    assert_403(daemon.api_call("PUT", f"/v1/registry/leases/{lease}/health", {"healthy": False}, token=a2), "another token")
    endpoints = daemon.api_json("GET", "/v1/registry/services/svc.a")["endpoints"]
    assert [(e["id"], e["port"], e["healthy"]) for e in endpoints] == [("e1", 7000, True)], endpoints
    # A read token cannot register at all.
    assert_403(put(create_token(daemon, "reg-reader", "read"), "svc.a", "e9"), "needs scope registry:svc.a")

    # Its owner can; so can an admin.
    assert daemon.api_call("POST", f"/v1/registry/leases/{lease}/heartbeat", token=a1).status == 200
    assert daemon.api_call("DELETE", "/v1/registry/services/svc.a/endpoints/e1", token=a1).status == 204
    assert put(a2, "svc.a", "e2").status == 200
    assert daemon.api_call("DELETE", "/v1/registry/services/svc.a/endpoints/e2").status == 204
    assert daemon.api_json("GET", "/v1/registry/services/svc.a")["endpoints"] == []


STAND_IN_SIDECAR = r'''#!/usr/bin/env python3
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
opts = {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--") and not argv[i + 1].startswith("--")}
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "sidecar-token.json"), "w") as f:
    json.dump({"token": os.environ.get("APUS_REGISTRY_TOKEN"), "registry": opts["registry"], "service": opts["service"]}, f)
server = ThreadingHTTPServer((opts.get("outbound-address", "127.0.0.1"), int(opts["outbound-port"])), BaseHTTPRequestHandler)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown, daemon=True).start())
server.serve_forever()
'''


def test_sidecar_token_may_register_its_own_service_only(tmp_path):
    sidecar_dir = tmp_path / "sidecar"
    sidecar_dir.mkdir()
    stand_in = sidecar_dir / "apus-sidecar"
    stand_in.write_text(STAND_IN_SIDECAR)
    stand_in.chmod(0o755)
    d = Apusd(tmp_path / "apusd", extra_args=("--sidecar-binary", str(stand_in)))
    try:
        d.start()
        fn = write_headecho(tmp_path / "fn", name="side-token")
        with open(fn / "apus.yaml", "a") as f:
            f.write("mesh: {service: side.token, sidecar: true}\n")
        d.deploy(fn)
        assert d.get("/side-token/").status == 200
        record = json.loads((sidecar_dir / "sidecar-token.json").read_text())
        token = record["token"]
        assert record["registry"] == d.api and record["service"] == "side.token", record
        assert token and token.startswith("apus_") and token != d.admin_token, record
        put = lambda service: d.api_call("PUT", f"/v1/registry/services/{service}/endpoints/x1", registration(), token=token)
        assert put("side.token").status == 200
        assert_403(put("payments.refund"), "needs scope registry:payments.refund")
        assert d.api_call("GET", "/v1/registry/services/payments.refund", token=token).status == 200
        assert_403(d.api_call("GET", "/v1/functions", token=token), "needs scope read")
        assert_403(d.api_call("DELETE", "/v1/functions/side-token", token=token), "needs scope deploy")
        # Minted for this run, never stored.
        assert "side.token" not in json.dumps(d.api_json("GET", "/v1/tokens"))
    finally:
        d.teardown()


# --------------------------------------------------------------------------------------------------------------
# Task progress capabilities

CAPABILITY_FUNCTION = '''
import time

def handler(event, context):
    if event["path"] == "/hold":
        print("progress-url " + context.progress_url, flush=True)
        time.sleep(float(event["query"].get("s", "20")))
        return "held"
    return {"progress_url": context.progress_url}
'''


def task_state(d: Apusd, task_id: str) -> dict:
    return d.api_json("GET", f"/v1/tasks/{task_id}")


@pytest.mark.timeout(120)
def test_progress_capability_is_for_its_task_only(daemon, tmp_path):
    fn = tmp_path / "capgrab"
    fn.mkdir()
    (fn / "main.py").write_text(CAPABILITY_FUNCTION)
    (fn / "apus.yaml").write_text("name: capgrab\nruntime: python3\nhandler: main.handler\nasync: {timeout: 2m}\n")
    daemon.deploy(fn)

    held = daemon.api_call("POST", "/v1/functions/capgrab/tasks?path=/hold%3Fs%3D30", body=b"").json()["id"]
    line = wait_for_log(daemon, "capgrab", "progress-url ", timeout=30)
    held_url = line.group("text").split(" ", 1)[1]
    # The control API's route, or (an instance in a network namespace of its own cannot reach the API) apusd's
    # instance API, which serves that route alone.
    base, path = held_url.split("/v1/tasks/", 1)
    path = "/v1/tasks/" + path
    assert path.startswith(f"/v1/tasks/{held}/progress?capability="), held_url
    instance_api = (daemon.info.get("sandboxLayers") or {}).get("network")
    assert base == daemon.api or (instance_api and base.endswith(":15002")), held_url
    capability = held_url.split("capability=", 1)[1]

    # With no token at all, the capability posts its own task's progress (where the function reaches, and on the
    # control API).
    r = http_request(base, "POST", path, body=b'{"progress": 0.4, "message": "almost half"}',
                     headers={"Content-Type": "application/json"}, token=None)
    assert r.status == 200, r
    r = http_request(daemon.api, "POST", path, body=b'{"progress": 0.5, "message": "half"}',
                     headers={"Content-Type": "application/json"}, token=None)
    assert r.status == 200, r
    state = task_state(daemon, held)
    assert (state["progress"], state["progressMessage"]) == (0.5, "half"), state

    # Not another task's, not with a changed capability, and not the API.
    other = daemon.api_call("POST", "/v1/functions/capgrab/tasks?path=/url", body=b"").json()["id"]
    wait_until(lambda: task_state(daemon, other)["state"] == "succeeded", 30, "the second task never finished")
    other_url = json.loads(task_state(daemon, other)["result"])["progress_url"]
    assert other_url.split("capability=", 1)[1] != capability
    for target in [f"/v1/tasks/{other}/progress?capability={capability}", f"/v1/tasks/{held}/progress?capability={capability}x",
                   f"/v1/tasks/{held}/progress"]:
        r = http_request(daemon.api, "POST", target, body=b'{"progress": 0.9}', headers={"Content-Type": "application/json"}, token=None)
        assert_401(r, "bearer token")
        if base != daemon.api:
            r = http_request(base, "POST", target, body=b'{"progress": 0.9}', headers={"Content-Type": "application/json"},
                             token=None)
            assert r.status == 403 and "capability" in r.text, r
            # The instance API takes no bearer token either, not even the admin's.
            r = http_request(base, "POST", target, body=b'{"progress": 0.9}', headers={"Content-Type": "application/json"})
            assert r.status == 403, r
    assert_401(daemon.api_call("GET", "/v1/functions", token=capability), "not known")
    r = http_request(daemon.api, "GET", f"/v1/tasks/{held}?capability={capability}", token=None)
    assert_401(r, "bearer token")
    r = http_request(daemon.api, "DELETE", f"/v1/tasks/{held}?capability={capability}", headers={"Host": "127.0.0.1"}, token=None)
    assert_401(r, "bearer token")
    assert task_state(daemon, held)["progress"] == 0.5
    assert daemon.api_call("DELETE", f"/v1/tasks/{held}").status in (200, 202)


# --------------------------------------------------------------------------------------------------------------
# The CLI


def test_cli_token_create_list_revoke(daemon, tmp_path):
    out = daemon.cli_ok("token", "create", "cli-reader", "--scope", "read", "--expires", "24h")
    secret = out.strip()
    assert re.fullmatch(r"apus_[A-Za-z0-9_-]{43}", secret), out
    listing = daemon.cli_ok("token", "list")
    assert "cli-reader" in listing and "read" in listing and "admin" in listing, listing
    assert "apus_" not in listing, listing
    listed = {t["name"]: t for t in daemon.cli_json("token", "list")["tokens"]}
    assert listed["cli-reader"]["scopes"] == ["read"] and listed["cli-reader"]["expiresAt"], listed

    # The new token lists, and is refused a deploy naming the scope.
    assert daemon.cli("list", token=secret)[0] == 0
    write_headecho(tmp_path / "fn", name="cli-denied")
    rc, _, err = daemon.cli("deploy", str(tmp_path / "fn"), token=secret)
    assert rc == 1 and "needs scope deploy" in err and "HTTP 403" in err, err
    rc, _, err = daemon.cli("token", "list", token=secret)
    assert rc == 1 and "needs scope admin" in err, err
    # --token wins over APUS_TOKEN.
    rc, _, err = daemon.cli("--token", secret, "token", "list")
    assert rc == 1 and "needs scope admin" in err, err

    assert daemon.cli_ok("token", "revoke", "cli-reader").strip() == "revoked cli-reader"
    rc, _, err = daemon.cli("list", token=secret)
    assert rc == 1 and "not known" in err and "HTTP 401" in err, err
    rc, _, err = daemon.cli("list", token=None)
    assert rc == 1 and "needs a bearer token" in err, err
    rc, _, err = daemon.cli("token", "create", "no-scope")
    assert rc != 0 and "--scope" in err, err


def test_cli_finds_the_local_admin_token_like_a_kubeconfig(tmp_path):
    """`apus` run where `.apus/` is (the README's Scripts/up layout) needs no --api and no token."""
    d = Apusd(tmp_path)
    d.data_dir = tmp_path / ".apus"
    try:
        d.start()
        env = {k: v for k, v in os.environ.items() if k not in ("APUS_API", "APUS_TOKEN")}
        p = subprocess.run([str(APUS), "list"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
        assert p.returncode == 0 and "no functions" in p.stdout, p
        p = subprocess.run([str(APUS), "token", "list"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
        assert p.returncode == 0 and "admin" in p.stdout, p
        # The local token goes to the local API only: another --api gets none.
        p = subprocess.run([str(APUS), "--api", f"http://localhost:{d.api_port}", "list"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=60)
        assert p.returncode == 1 and "needs a bearer token" in p.stderr, p
    finally:
        d.teardown()


# --------------------------------------------------------------------------------------------------------------
# Audit


def test_every_mutating_call_leaves_an_audit_line(daemon):
    r = daemon.api_call("PUT", "/v1/functions/audit-nosuch/scale", {"max": 1})
    assert r.status == 404
    daemon.api_call("DELETE", "/v1/functions/audit-anonymous", token=None)
    daemon.api_call("GET", "/v1/functions/audit-read-only")

    def lines():
        return [l for l in daemon.log_path.read_text(errors="replace").splitlines() if "apus.audit" in l]

    wait_until(lambda: any("path=/v1/functions/audit-anonymous" in l for l in lines()), 5, "no audit line")
    audit = lines()
    assert any("token=admin" in l and "method=PUT" in l and "path=/v1/functions/audit-nosuch/scale" in l and "status=404" in l
               for l in audit), audit
    assert any("token=-" in l and "method=DELETE" in l and "path=/v1/functions/audit-anonymous" in l and "status=401" in l
               for l in audit), audit
    assert not any("audit-read-only" in l for l in audit), "reads are not audited"
    # Capabilities and secrets never reach the log.
    text = daemon.log_path.read_text(errors="replace")
    assert daemon.admin_token not in text
    assert "capability=" not in "\n".join(audit)
    # Every route the router serves has a rule (the daemon warns at start otherwise).
    assert "control route without a rule" not in text
