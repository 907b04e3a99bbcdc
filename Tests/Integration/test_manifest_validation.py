"""Manifest validation through the control API: bad apus.yaml files are rejected with the key path, nothing is created."""

import re

import pytest

from apus_testlib import assert_error, tar_gz_dir

MAIN_PY = "def handler(event, context):\n    return {'v': 'a'}\n"

# (case id, function name, apus.yaml text, regex the error message must match: the key path)
CASES = [
    ("unknown-key", "bad-unknown-key",
     "name: bad-unknown-key\nruntime: python3\nscael: {}\n", r"\bscael\b"),
    ("concurrency-zero", "bad-concurrency",
     "name: bad-concurrency\nruntime: python3\nconcurrency: zero\n", r"\bconcurrency\b"),
    ("timeout-parsecs", "bad-timeout",
     "name: bad-timeout\nruntime: python3\ntimeout: 5 parsecs\n", r"\btimeout\b"),
    ("scale-min-above-max", "bad-scale",
     "name: bad-scale\nruntime: python3\nscale: {min: 3, max: 1}\n", r"\bscale\.(min|max)\b"),
    ("runtime-ruby", "bad-runtime",
     "name: bad-runtime\nruntime: ruby\n", r"\bruntime\b"),
    ("concurrency-below-one", "bad-concurrency-0",
     "name: bad-concurrency-0\nruntime: python3\nconcurrency: 0\n", r"\bconcurrency\b"),
    ("command-missing", "bad-command",
     "name: bad-command\nruntime: command\n", r"\bcommand\b"),
    ("env-not-a-map", "bad-env",
     "name: bad-env\nruntime: python3\nenv: [1, 2]\n", r"\benv\b"),
    ("name-invalid", "Bad_Name",
     "name: Bad_Name\nruntime: python3\n", r"\bname\b"),
]


def write_function(root, manifest):
    root.mkdir(parents=True)
    (root / "apus.yaml").write_text(manifest)
    (root / "main.py").write_text(MAIN_PY)
    return root


def assert_not_created(apusd, name):
    names = [f["name"] for f in apusd.api_json("GET", "/v1/functions")["functions"]]
    assert name not in names
    if re.fullmatch(r"[a-z][a-z0-9-]{0,62}", name):  # an invalid name may be refused as bad_request instead
        assert_error(apusd.api_call("GET", f"/v1/functions/{name}"), 404, "not_found")
        assert_error(apusd.get(f"/{name}/"), 404, "not_found")


@pytest.mark.parametrize("case,name,manifest,key", CASES, ids=[c[0] for c in CASES])
def test_bad_manifest_rejected_by_cli(apusd, tmp_path, case, name, manifest, key):
    func_dir = write_function(tmp_path / case, manifest)
    rc, out, err = apusd.cli("deploy", func_dir)
    assert rc == 1, f"deploy of a bad manifest must exit 1, got {rc}\nstdout: {out}\nstderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apus: error: "), f"expected one error line, got {err!r}"
    assert re.search(key, lines[0]), f"the error does not name the key path ({key}): {lines[0]!r}"
    assert_not_created(apusd, name)


@pytest.mark.parametrize("case,name,manifest,key", CASES, ids=[c[0] for c in CASES])
def test_bad_manifest_rejected_by_api(apusd, tmp_path, case, name, manifest, key):
    func_dir = write_function(tmp_path / case, manifest)
    r = apusd.api_call("POST", "/v1/functions", body=tar_gz_dir(func_dir),
                       headers={"Content-Type": "application/gzip"})
    err = assert_error(r, 400, "bad_request")
    assert re.search(key, err["message"]), f"the message does not name the key path ({key}): {err['message']!r}"
    assert_not_created(apusd, name)


def test_api_deploy_tarball_and_release_false(apusd, tmp_path):
    """POST /v1/functions with a tar.gz; `release=false` keeps traffic on the released version."""
    func_dir = write_function(tmp_path / "tarball", "name: tarball-ok\nruntime: python3\n")
    r = apusd.api_call("POST", "/v1/functions", body=tar_gz_dir(func_dir),
                       headers={"Content-Type": "application/gzip"})
    assert r.status == 201, r
    doc = r.json()
    assert doc["function"] == "tarball-ok"
    assert doc["version"]["number"] == 1
    assert doc["version"]["function"] == "tarball-ok"
    assert re.match(r"^sha256:[0-9a-f]{64}$", doc["version"]["codeDigest"])
    # Defaults are filled in.
    m = doc["version"]["manifest"]
    assert m["handler"] == "main.handler" and m["concurrency"] == 10
    assert m["scale"]["min"] == 0 and m["scale"]["max"] == 5
    assert doc["release"]["weights"] == [{"version": 1, "weight": 100}]
    first_digest = doc["version"]["codeDigest"]

    r = apusd.get("/tarball-ok/")
    assert r.status == 200 and r.json() == {"v": "a"}, r

    (func_dir / "main.py").write_text(MAIN_PY.replace("'a'", "'b'"))
    r = apusd.api_call("POST", "/v1/functions?release=false", body=tar_gz_dir(func_dir),
                       headers={"Content-Type": "application/gzip"})
    assert r.status == 201, r
    doc = r.json()
    assert doc["version"]["number"] == 2
    assert doc["version"]["codeDigest"] != first_digest
    assert doc["release"]["weights"] == [{"version": 1, "weight": 100}]

    for _ in range(5):
        r = apusd.get("/tarball-ok/")
        assert r.status == 200 and r.json() == {"v": "a"}, r
        assert r.header("X-Apus-Version") == "1"
    r = apusd.get("/tarball-ok/", headers={"X-Apus-Version": "2"})
    assert r.status == 200 and r.json() == {"v": "b"}, r

    release = apusd.api_json("PUT", "/v1/functions/tarball-ok/release", {"weights": [{"version": 2, "weight": 100}]})
    assert release["function"] == "tarball-ok"
    assert release["weights"] == [{"version": 2, "weight": 100}]
    r = apusd.get("/tarball-ok/")
    assert r.status == 200 and r.json() == {"v": "b"}, r
    assert r.header("X-Apus-Version") == "2"


def test_api_deploy_tarball_with_bare_entry_names(apusd, tmp_path):
    """A tar.gz made without the leading "./" (e.g. Python's tarfile, `tar -czf x apus.yaml main.py`) is the
    same function dir and must deploy too."""
    func_dir = write_function(tmp_path / "bare", "name: tarball-bare\nruntime: python3\n")
    r = apusd.api_call("POST", "/v1/functions", body=tar_gz_dir(func_dir, prefix=""),
                       headers={"Content-Type": "application/gzip"})
    assert r.status == 201, r
    assert r.json()["version"]["number"] == 1
    r = apusd.get("/tarball-bare/")
    assert r.status == 200 and r.json() == {"v": "a"}, r


def test_bad_release_rejected(apusd, deployed):
    deployed.example("hello-python")
    # A version that does not exist.
    r = apusd.api_call("PUT", "/v1/functions/hello-python/release", {"weights": [{"version": 99, "weight": 100}]})
    assert r.status in (400, 404), r
    assert_error(r, r.status, "bad_request" if r.status == 400 else "not_found")
    # All weights zero.
    r = apusd.api_call("PUT", "/v1/functions/hello-python/release", {"weights": [{"version": 1, "weight": 0}]})
    assert_error(r, 400, "bad_request")
    # Not JSON.
    r = apusd.api_call("PUT", "/v1/functions/hello-python/release", b"{nope", {"Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")
    # Unchanged.
    doc = apusd.api_json("GET", "/v1/functions/hello-python")
    assert doc["release"]["weights"] == [{"version": 1, "weight": 100}]
