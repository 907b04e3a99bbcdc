"""Per-function invocation auth (`auth:` in apus.yaml) against a real apusd, through every HTTP edge and real
clients: Python's http.client (HTTP/1.1, kept-alive connections, which the edge reactor would serve), curl over
HTTP/2 with prior knowledge, grpcio with call metadata, and asynchronous submissions. Apus tokens need the scope
`invoke:<function>` (or `invoke`, `admin`); JWTs are signed here with `cryptography` (ES256) and the stdlib (HS256)
and checked by the gateway against the function's JWKS or stored HMAC secret. Each attack (no credential, a token of
another scope or function, a revoked token, alg none, a tampered or expired token, the wrong audience, pinning an
older version that had no auth:) is shown refused, with the credential never reaching the instance.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from apus_testlib import Apusd, KeepAliveClient, assert_error, copy_function, write_headecho
from grpc_support import ECHO_DIR, echo_stub, insecure_channel, req

ISSUER = "https://id.apus.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims(**overrides) -> dict:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "orders", "sub": "ada", "exp": now + 600}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def es256(key: ec.EllipticCurvePrivateKey, body: dict, kid: str = "k1") -> str:
    signing_input = segment({"alg": "ES256", "typ": "JWT", "kid": kid}) + "." + segment(body)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def hs256(secret: bytes, body: dict) -> str:
    signing_input = segment({"alg": "HS256", "typ": "JWT"}) + "." + segment(body)
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def jwks(key: ec.EllipticCurvePrivateKey, kid: str = "k1") -> str:
    numbers = key.public_key().public_numbers()
    return json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                                 "x": b64(numbers.x.to_bytes(32, "big")), "y": b64(numbers.y.to_bytes(32, "big"))}]})


def headecho_with(scratch: Path, name: str, auth_yaml: str) -> Path:
    fn = write_headecho(scratch / name, name=name)
    manifest = fn / "apus.yaml"
    manifest.write_text(manifest.read_text() + auth_yaml)
    return fn


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Apusd(tmp_path_factory.mktemp("apusd-fn-auth"))
    try:
        d.start()
        yield d
    finally:
        d.teardown()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fn-auth-functions")


@pytest.fixture(scope="module")
def idp_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def fns(daemon, scratch, idp_key):
    daemon.deploy(headecho_with(scratch, "guarded", "auth:\n  tokens: true\n"))
    daemon.deploy(headecho_with(scratch, "open-echo", ""))
    inline = json.dumps(jwks(idp_key))
    daemon.deploy(headecho_with(scratch, "orders", (
        "auth:\n  jwt:\n"
        f"    issuer: {ISSUER}\n    audiences: [orders]\n    jwks: {inline}\n    leeway: 5s\n    forward: true\n")))
    return daemon


def token(daemon, name: str, *scopes: str) -> str:
    out = daemon.cli_json("token", "create", name, *[a for s in scopes for a in ("--scope", s)])
    return out["secret"] if "secret" in out else out["token"]


@pytest.fixture(scope="module")
def tokens(fns):
    return {
        "guarded": token(fns, "call-guarded", "invoke:guarded"),
        "other": token(fns, "call-other", "invoke:open-echo"),
        "reader": token(fns, "reader", "read"),
        "any": token(fns, "call-any", "invoke"),
    }


def test_http1_needs_an_invoke_token_for_the_function(fns, tokens):
    r = fns.get("/guarded/hi")
    assert_error(r, 401, "unauthenticated")
    assert r.header("WWW-Authenticate", "").startswith("Bearer"), r.headers
    assert "invoke:guarded" in r.json()["error"]["message"]
    assert_error(fns.get("/guarded/hi", headers=bearer("apus_not-a-token")), 401, "unauthenticated")
    assert_error(fns.get("/guarded/hi", headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="}), 401, "unauthenticated")
    r = fns.get("/guarded/hi", headers=bearer(tokens["reader"]))
    assert_error(r, 403, "forbidden")
    assert "invoke:guarded" in r.json()["error"]["message"]
    assert_error(fns.get("/guarded/hi", headers=bearer(tokens["other"])), 403, "forbidden")

    for credential in (tokens["guarded"], tokens["any"]):
        r = fns.get("/guarded/hi?x=1", headers={**bearer(credential), "X-Trace": "t1"})
        assert r.status == 200, r
        seen = r.json()
        assert seen["path"] == "/hi?x=1" and seen["headers"]["x-trace"] == "t1"
        assert "authorization" not in seen["headers"], "the Apus token must not reach the instance"


def test_duplicate_authorization_headers_are_refused(fns, tokens):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(fns.gateway)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("GET", "/guarded/hi")
    conn.putheader("Authorization", f"Bearer {tokens['guarded']}")
    conn.putheader("Authorization", "Bearer apus_smuggled")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 400 and b"more than one Authorization" in body, (resp.status, body)


def test_kept_alive_connections_are_checked_on_every_request(fns, tokens):
    # The same connection alternates between an authorised and an anonymous call: the edge's fast path (the reactor)
    # must not remember the first one.
    client = KeepAliveClient(fns.gateway)
    try:
        for _ in range(3):
            assert client.request("GET", "/guarded/a", headers=bearer(tokens["guarded"])).status == 200
            assert client.request("GET", "/guarded/b").status == 401
            assert client.request("GET", "/open-echo/c").status == 200
    finally:
        client.close()


def test_functions_without_auth_stay_open_and_see_their_headers(fns, tokens):
    r = fns.get("/open-echo/x", headers={"Authorization": "Bearer app-level-token"})
    assert r.status == 200, r
    assert r.json()["headers"]["authorization"] == "Bearer app-level-token", "without auth: the header is the function's"


def test_pinning_an_older_version_without_auth_does_not_skip_it(fns, scratch, tokens):
    fns.deploy(headecho_with(scratch, "pinned", ""))
    assert fns.get("/pinned/x").status == 200
    fns.deploy(headecho_with(scratch / "v2", "pinned", "auth:\n  tokens: true\n"))
    assert_error(fns.get("/pinned/x"), 401, "unauthenticated")
    assert_error(fns.get("/pinned/x", headers={"X-Apus-Version": "1"}), 401, "unauthenticated")
    admin = fns.admin_token
    assert fns.get("/pinned/x", headers={**bearer(admin), "X-Apus-Version": "1"}).status == 200


def test_revoked_token_stops_working(fns):
    secret = token(fns, "short-lived", "invoke:guarded")
    assert fns.get("/guarded/x", headers=bearer(secret)).status == 200
    fns.cli_ok("token", "revoke", "short-lived")
    assert_error(fns.get("/guarded/x", headers=bearer(secret)), 401, "unauthenticated")


def curl_h2(daemon, path: str, *args: str) -> tuple[int, str, dict]:
    p = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20", "-D", "-", *args,
                        daemon.gateway + path], capture_output=True, text=True, timeout=40)
    assert p.returncode == 0, p.stderr
    head, _, body = p.stdout.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split()[1])
    assert head.startswith("HTTP/2"), head
    return status, body, {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip()
                          for line in head.splitlines()[1:] if ":" in line}


def test_http2_checks_and_strips_the_credential(fns, tokens):
    status, body, headers = curl_h2(fns, "/guarded/h2")
    assert status == 401 and "unauthenticated" in body and headers.get("www-authenticate", "").startswith("Bearer")
    status, body, _ = curl_h2(fns, "/guarded/h2", "-H", f"Authorization: Bearer {tokens['reader']}")
    assert status == 403, body
    status, body, _ = curl_h2(fns, "/guarded/h2", "-H", f"Authorization: Bearer {tokens['guarded']}")
    assert status == 200, body
    assert "authorization" not in json.loads(body)["headers"]


def test_async_submissions_are_checked(fns, tokens):
    r = fns.gw("POST", "/guarded/job", body=b"{}", headers={"X-Apus-Invocation": "async"})
    assert_error(r, 401, "unauthenticated")
    r = fns.gw("POST", "/async/guarded/job", body=b"{}")
    assert_error(r, 401, "unauthenticated")
    r = fns.gw("POST", "/guarded/job", body=b"{}", headers={"X-Apus-Invocation": "async", **bearer(tokens["guarded"])})
    assert r.status == 202, r
    status, body, _ = curl_h2(fns, "/async/guarded/job", "-X", "POST", "--data-binary", "{}")
    assert status == 401, body


def test_jwt_from_the_identity_provider(fns, idp_key):
    good = es256(idp_key, claims())
    r = fns.get("/orders/list", headers=bearer(good))
    assert r.status == 200, r
    assert r.json()["headers"]["authorization"] == f"Bearer {good}", "forward: true hands the verified JWT on"
    # Over HTTP/2 as well.
    status, body, _ = curl_h2(fns, "/orders/list", "-H", f"Authorization: Bearer {good}")
    assert status == 200, body

    attacker = ec.generate_private_key(ec.SECP256R1())
    header, payload, signature = good.split(".")
    refused = {
        "no credential": None,
        "signed by another key": es256(attacker, claims()),
        "tampered subject": header + "." + segment(claims(sub="root")) + "." + signature,
        "alg none": segment({"alg": "none", "typ": "JWT"}) + "." + segment(claims()) + ".",
        "expired": es256(idp_key, claims(exp=int(time.time()) - 60)),
        "not yet valid": es256(idp_key, claims(nbf=int(time.time()) + 120)),
        "no expiry": es256(idp_key, claims(exp=None)),
        "wrong issuer": es256(idp_key, claims(iss="https://evil.test")),
        "wrong audience": es256(idp_key, claims(aud="billing")),
        "unknown kid": es256(idp_key, claims(), kid="k9"),
        "an Apus token": "apus_" + "x" * 43,
    }
    for case, credential in refused.items():
        r = fns.get("/orders/list", headers=bearer(credential) if credential else None)
        assert r.status == 401, f"{case}: {r!r}"
        assert r.json()["error"]["code"] == "unauthenticated", case


def test_hmac_key_in_a_stored_secret_follows_rotation(fns, scratch):
    first = "k" * 40
    fns.cli_ok("secret", "set", "idp", "hs256", "--value", first)
    fns.deploy(headecho_with(scratch, "hooks", (
        "auth:\n  jwt:\n"
        f"    issuer: {ISSUER}\n    hmac_secret: {{secret: idp, key: hs256}}\n")))
    old = hs256(first.encode(), claims(aud=None))
    r = fns.get("/hooks/in", headers=bearer(old))
    assert r.status == 200, r
    assert "authorization" not in r.json()["headers"], "forward defaults to false"

    second = "z" * 48
    fns.cli_ok("secret", "set", "idp", "hs256", "--value", second)
    assert_error(fns.get("/hooks/in", headers=bearer(old)), 401, "unauthenticated")
    assert fns.get("/hooks/in", headers=bearer(hs256(second.encode(), claims(aud=None)))).status == 200


def test_deploys_with_unusable_keys_are_refused_with_the_reason(fns, scratch):
    cases = {
        "bad-jwks": ("auth:\n  jwt:\n    issuer: x\n    jwks: '{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"AA\", \"y\": \"AA\"}]}'\n",
                     "JWKS key 0"),
        "missing-secret": ("auth:\n  jwt:\n    issuer: x\n    hmac_secret: {secret: nowhere, key: k}\n",
                           "auth.jwt.hmac_secret: there is no secret nowhere"),
        "short-hmac": ("auth:\n  jwt:\n    issuer: x\n    hmac_secret: {secret: idp, key: short}\n", "at least 32"),
        "no-credential": ("auth:\n  tokens: false\n", "auth: names no credential"),
    }
    fns.cli_ok("secret", "set", "idp", "short", "--value", "tiny")
    for name, (yaml, expected) in cases.items():
        rc, out, err = fns.cli("deploy", str(headecho_with(scratch, name, yaml)))
        assert rc != 0 and expected in out + err, (name, rc, out, err)
        assert fns.get(f"/{name}/").status == 404, f"{name} must not exist after a refused deploy"


def test_grpc_calls_carry_the_token_as_metadata(fns, scratch, tokens):
    fns.deploy(copy_function(ECHO_DIR, scratch / "echo-guarded", name="echo-guarded",
                             subs=[(r"\Z", "auth:\n  tokens: true\n")]))
    secret = token(fns, "grpc-caller", "invoke:echo-guarded")
    channel = insecure_channel(fns)
    try:
        stub = echo_stub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Get(req(text="hi"), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        with pytest.raises(grpc.RpcError) as denied:
            stub.Get(req(text="hi"), timeout=20, metadata=[("authorization", f"Bearer {tokens['reader']}")])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, denied.value
        assert "invoke:echo-guarded" in denied.value.details()
        r = stub.Get(req(text="hi"), timeout=30, metadata=[("authorization", f"Bearer {secret}")])
        assert r.text == "hi"
    finally:
        channel.close()


def test_cli_invoke_sends_its_token_only_to_functions_that_take_tokens(fns):
    out = fns.cli_ok("invoke", "guarded", "--path", "/cli", "--with-token")
    assert json.loads(out)["path"] == "/cli"
    assert "authorization" not in json.loads(out)["headers"]
    rc, out, err = fns.cli("invoke", "guarded", "--path", "/cli")
    assert rc != 0 and "bearer token" in err, (rc, out, err)
    rc, out, err = fns.cli("invoke", "open-echo", "--with-token")
    assert rc != 0 and "takes no Apus tokens" in err, (rc, out, err)
