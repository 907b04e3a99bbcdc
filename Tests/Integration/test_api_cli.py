"""Deploy with the CLI, inspect with the CLI and the API, invoke through the gateway (curl, urllib, `apus invoke`)."""

import json
import re
import subprocess
import urllib.request

from apus_testlib import KeepAliveClient

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def curl(*args, timeout=30):
    """Run the real curl with -s -i; returns (status, headers{lower: value}, body)."""
    p = subprocess.run(["curl", "-s", "-i", "--max-time", str(timeout), *args], capture_output=True, timeout=timeout + 5)
    assert p.returncode == 0, f"curl {args} failed: rc {p.returncode} {p.stderr!r}"
    head, _, body = p.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def functions_of(doc):
    """`apus list --json` may print the API document or just its array."""
    return doc["functions"] if isinstance(doc, dict) else doc


def versions_of(doc):
    return doc["versions"] if isinstance(doc, dict) else doc


def test_info_matches_ports(apusd):
    info = apusd.api_json("GET", "/v1/info")
    assert isinstance(info["version"], str) and info["version"]
    assert info["gateway"]["http"] == apusd.gateway
    assert info["domain"] == "apus.localhost"
    assert info["sandbox"] in ("bwrap", "rlimits")


def test_deploy_examples_with_cli(deployed):
    for example in ("hello-python", "hello-command"):
        name = deployed.example(example)
        assert name == example
        assert name in deployed.outputs[name], f"`apus deploy` output does not name the function: {deployed.outputs[name]!r}"


def test_list_human_and_json(apusd, deployed):
    deployed.example("hello-python")
    deployed.example("hello-command")

    out = apusd.cli_ok("list")
    for name in ("hello-python", "hello-command"):
        assert re.search(rf"(^|\s){name}(\s|$)", out, re.MULTILINE), f"{name} missing from `apus list`:\n{out}"

    cli_doc = functions_of(apusd.cli_json("list"))
    api_doc = apusd.api_json("GET", "/v1/functions")["functions"]
    by_name = {f["name"]: f for f in cli_doc}
    assert by_name == {f["name"]: f for f in api_doc}, "`apus list --json` disagrees with GET /v1/functions"
    for name in ("hello-python", "hello-command"):
        f = by_name[name]
        assert f["latestVersion"] == 1
        assert f["release"]["function"] == name
        assert f["release"]["weights"] == [{"version": 1, "weight": 100}]
        assert f["createdAt"] and f["updatedAt"]


def test_get_human_and_json(apusd, deployed):
    deployed.example("hello-python")
    out = apusd.cli_ok("get", "hello-python")
    assert "hello-python" in out

    doc = apusd.cli_json("get", "hello-python")
    assert doc == apusd.api_json("GET", "/v1/functions/hello-python")
    assert doc["name"] == "hello-python"
    assert doc["latestVersion"] == 1
    assert doc["release"]["weights"] == [{"version": 1, "weight": 100}]
    [v] = doc["versions"]
    assert v["function"] == "hello-python" and v["number"] == 1
    assert DIGEST_RE.match(v["codeDigest"]), v["codeDigest"]
    m = v["manifest"]
    assert m["name"] == "hello-python" and m["runtime"] == "python3" and m["handler"] == "main.handler"
    assert m["concurrency"] == 4
    assert m["scale"]["min"] == 0 and m["scale"]["max"] == 3
    assert m["env"] == {"GREETING": "Hello"}


def test_versions_human_and_json(apusd, deployed):
    deployed.example("hello-python")
    out = apusd.cli_ok("versions", "hello-python")
    assert re.search(r"(^|\s)v?1\s", out, re.MULTILINE), f"version 1 not shown by `apus versions`:\n{out}"

    versions = versions_of(apusd.cli_json("versions", "hello-python"))
    assert [v["number"] for v in versions] == [1]
    assert versions == apusd.api_json("GET", "/v1/functions/hello-python/versions")["versions"]
    assert apusd.api_json("GET", "/v1/functions/hello-python/versions/1") == versions[0]


def test_invoke_with_curl(apusd, deployed):
    deployed.example("hello-python")
    status, headers, body = curl(f"http://127.0.0.1:{apusd.http_port}/hello-python/?name=Curly")
    assert status == 200, body
    doc = json.loads(body)
    assert doc == {"message": "Hello, Curly!", "version": "1", "method": "GET", "path": "/"}
    assert headers.get("x-apus-version") == "1"
    assert headers.get("x-apus-request-id")
    assert "json" in headers.get("content-type", "")


def test_invoke_with_urllib(apusd, deployed):
    deployed.example("hello-python")
    with urllib.request.urlopen(f"{apusd.gateway}/hello-python/greet?name=Urllib", timeout=30) as r:
        assert r.status == 200
        assert r.headers["X-Apus-Version"] == "1"
        doc = json.loads(r.read())
    assert doc["message"] == "Hello, Urllib!"
    assert doc["path"] == "/greet"


def test_invoke_command_runtime(apusd, deployed):
    deployed.example("hello-command")
    status, headers, body = curl(f"http://127.0.0.1:{apusd.http_port}/hello-command/some/path?x=1")
    assert status == 200, body
    assert body.decode() == "hello from a plain HTTP server\n/some/path?x=1\n"
    assert headers.get("x-apus-version") == "1"


def test_invoke_with_cli(apusd, deployed):
    deployed.example("hello-python")
    out = apusd.cli_ok("invoke", "hello-python", "--path", "/hi?name=Ada")
    assert json.loads(out) == {"message": "Hello, Ada!", "version": "1", "method": "GET", "path": "/hi"}

    out = apusd.cli_ok("invoke", "hello-python", "--data", '{"a": 1}', "--path", "/x", "-H", "k: v")
    doc = json.loads(out)
    assert doc["path"] == "/x"
    assert doc["method"] == "POST", "--data without -X should send a POST"


def test_invoke_cli_sends_headers_and_body(apusd, deployed, tmp_path):
    deployed.headecho()
    out = apusd.cli_ok("invoke", "headecho", "--data", "payload-123", "--path", "/x", "-H", "k: v", "-H", "X-Two: 2")
    doc = json.loads(out)
    assert doc["path"] == "/x"
    assert doc["method"] == "POST"
    assert doc["body"] == "payload-123"
    assert doc["headers"].get("k") == "v"
    assert doc["headers"].get("x-two") == "2"

    payload = tmp_path / "payload.txt"
    payload.write_text("from a file")
    doc = json.loads(apusd.cli_ok("invoke", "headecho", "--data", f"@{payload}", "-X", "PUT"))
    assert doc["method"] == "PUT"
    assert doc["body"] == "from a file"
    assert doc["path"] == "/"


def test_host_routing_with_curl(apusd, deployed):
    deployed.example("hello-python")
    status, headers, body = curl("-H", "Host: hello-python.apus.localhost",
                                 f"http://127.0.0.1:{apusd.http_port}/deep/path?name=Hosty")
    assert status == 200, body
    doc = json.loads(body)
    assert doc["message"] == "Hello, Hosty!"
    assert doc["path"] == "/deep/path", "host routing must leave the path unchanged"
    assert headers.get("x-apus-version") == "1"


def test_path_prefix_is_stripped(apusd, deployed):
    deployed.example("hello-python")
    r = apusd.get("/hello-python/some/deep?name=P")
    assert r.status == 200, r
    assert r.json()["path"] == "/some/deep"
    assert r.header("X-Apus-Version") == "1"


def test_forwarded_headers_reach_the_instance(apusd, deployed):
    deployed.headecho()
    r = apusd.get("/headecho/a/b?q=1", headers={"X-Custom": "yes"})
    assert r.status == 200, r
    doc = r.json()
    assert doc["path"] == "/a/b?q=1", "the /<function> prefix must be stripped and the query kept"
    h = doc["headers"]
    assert h.get("x-forwarded-prefix") == "/headecho"
    assert h.get("x-apus-function") == "headecho"
    assert h.get("x-apus-version") == "1"
    assert h.get("x-custom") == "yes"
    assert "127.0.0.1" in h.get("x-forwarded-for", "")
    assert h.get("x-forwarded-host") == f"127.0.0.1:{apusd.http_port}"
    assert h.get("x-apus-request-id"), h
    assert r.header("X-Apus-Request-Id") == h["x-apus-request-id"]
    assert r.header("X-Apus-Version") == "1"

    # Request ids are unique per request.
    r2 = apusd.get("/headecho/a/b")
    assert r2.json()["headers"]["x-apus-request-id"] != h["x-apus-request-id"]


def test_host_routing_keeps_path_and_sets_forwarded_host(apusd, deployed):
    deployed.headecho()
    r = apusd.get("/a/b?q=1", headers={"Host": "headecho.apus.localhost"})
    assert r.status == 200, r
    doc = r.json()
    assert doc["path"] == "/a/b?q=1"
    assert doc["headers"].get("x-forwarded-prefix") in (None, "", "/")
    assert doc["headers"].get("x-forwarded-host") == "headecho.apus.localhost"
    assert doc["headers"].get("x-apus-function") == "headecho"


def test_keep_alive_to_gateway(apusd, deployed):
    """Several requests on one client connection (HTTP/1.1 keep-alive)."""
    deployed.example("hello-python")
    c = KeepAliveClient(apusd.gateway)
    try:
        for i in range(5):
            r = c.request("GET", f"/hello-python/k{i}?name=K{i}")
            assert r.status == 200, r
            assert r.json()["path"] == f"/k{i}"
        assert c.connections_opened == 1, "the gateway closed a keep-alive connection"
    finally:
        c.close()

