"""Stored secrets against a real apusd and the real CLI: `apus secret set|list|delete`, `secrets:` in apus.yaml
(env var name -> stored secret and key) resolved into the instance's environment at start, values sealed at rest
with AES-GCM under `<data-dir>/secrets.key` (0600) and never returned by the API nor written in clear anywhere in
the data dir or apusd's log (debug logging on, cold and prewarmed starts).
"""

from __future__ import annotations

import json
import os
import secrets as random_secrets
import stat
from pathlib import Path

import pytest

from apus_testlib import Apusd, assert_error

HANDLER = """import os


def handler(event, context):
    return {"DB_PASSWORD": os.environ.get("DB_PASSWORD"), "API_KEY": os.environ.get("API_KEY"),
            "PLAIN": os.environ.get("PLAIN"), "instance": os.environ.get("APUS_INSTANCE")}
"""


def write_function(dst: Path, name: str, secrets_yaml: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "main.py").write_text(HANDLER)
    (dst / "apus.yaml").write_text(
        f"name: {name}\nruntime: python3\nhandler: main.handler\nenv:\n  PLAIN: visible\nsecrets:\n{secrets_yaml}")
    return dst


def fresh_value(label: str) -> str:
    return f"{label}-{random_secrets.token_hex(12)}"


def every_file_under(root: Path):
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                yield path, path.read_bytes()
            except OSError:
                pass  # a socket or a file gone meanwhile


def assert_nowhere_in_clear(d: Apusd, *values: str):
    """No file under the data dir (apus.db and its WAL, tasks, code, logs, …) nor apusd's own log holds a value."""
    files = list(every_file_under(d.data_dir)) + [(d.log_path, d.log_path.read_bytes())]
    assert any(path.name == "apus.db" for path, _ in files)
    for value in values:
        for path, data in files:
            assert value.encode() not in data, f"{value} is in clear in {path}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # Debug logging, and no waiting sandbox slots: every instance is spawned anew, which logs its argv.
    d = Apusd(tmp_path_factory.mktemp("apusd-secrets"), extra_args=("--log-level", "debug", "--sandbox-slots", "0"))
    try:
        d.start()
        yield d
    finally:
        d.teardown()


def test_key_file_is_made_private_on_first_start(daemon):
    key = daemon.data_dir / "secrets.key"
    assert key.exists(), os.listdir(daemon.data_dir)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)
    assert key.stat().st_size == 32


def test_set_list_and_use_a_secret(daemon, tmp_path):
    password = fresh_value("pw")
    api_key = fresh_value("key")
    # From stdin (one trailing newline dropped), with --value, and from a file.
    out = daemon.cli_ok("secret", "set", "db", "password", input=password + "\n")
    assert password not in out and "db" in out, out
    daemon.cli_ok("secret", "set", "db", "user", "--value", "app")
    key_file = tmp_path / "api.key"
    key_file.write_text(api_key)
    daemon.cli_ok("secret", "set", "payments", "api-key", "--from-file", key_file)

    listing = daemon.cli_json("secret", "list")
    names = {s["name"]: [k["key"] for k in s["keys"]] for s in listing["secrets"]}
    assert names["db"] == ["password", "user"] and names["payments"] == ["api-key"], listing
    assert all("updatedAt" in k for s in listing["secrets"] for k in s["keys"]), listing
    table = daemon.cli_ok("secret", "list")
    assert "password" in table and "api-key" in table, table
    for text in (json.dumps(listing), table):
        assert password not in text and api_key not in text

    fn = write_function(tmp_path / "fn", "secretuser",
                        "  DB_PASSWORD: {secret: db, key: password}\n  API_KEY:\n    secret: payments\n    key: api-key\n")
    daemon.deploy(fn)
    r = daemon.get("/secretuser/")
    assert r.status == 200, r
    env = r.json()
    assert env["DB_PASSWORD"] == password and env["API_KEY"] == api_key and env["PLAIN"] == "visible", env

    # The API shows the references, never the values (admin token included).
    for path in ("/v1/functions/secretuser", "/v1/functions/secretuser/versions", "/v1/functions/secretuser/versions/1",
                 "/v1/secrets"):
        r = daemon.api_call("GET", path)
        assert r.status == 200, r
        assert password not in r.text and api_key not in r.text, (path, r.text)
    version = daemon.api_json("GET", "/v1/functions/secretuser/versions/1")
    assert version["manifest"]["secrets"] == {"DB_PASSWORD": {"secret": "db", "key": "password"},
                                              "API_KEY": {"secret": "payments", "key": "api-key"}}, version
    got = daemon.cli_ok("get", "secretuser")
    assert password not in got and api_key not in got

    # Nothing in clear under the data dir, nor in apusd's debug log (argv of the spawn included).
    assert "instance spawned" in daemon.log_path.read_text(errors="replace")
    assert_nowhere_in_clear(daemon, password, api_key)


def test_reading_a_value_back_is_not_an_api_call(daemon):
    for method, path in (("GET", "/v1/secrets/db"), ("GET", "/v1/secrets/db/keys/password")):
        r = daemon.api_call(method, path)
        assert r.status in (404, 405), r
        assert "pw-" not in r.text


def test_a_secret_changed_later_is_seen_by_instances_started_afterwards(daemon, tmp_path):
    first = fresh_value("first")
    second = fresh_value("second")
    daemon.cli_ok("secret", "set", "rotating", "token", "--value", first)
    fn = write_function(tmp_path / "fn", "rotator", "  DB_PASSWORD: {secret: rotating, key: token}\n")
    daemon.deploy(fn)
    assert daemon.get("/rotator/").json()["DB_PASSWORD"] == first
    daemon.cli_ok("secret", "set", "rotating", "token", "--value", second)
    # The running instance keeps what it started with; a new version starts a new instance, which sees the change.
    daemon.deploy(fn)
    env = daemon.get("/rotator/").json()
    assert env["DB_PASSWORD"] == second, env
    assert_nowhere_in_clear(daemon, first, second)


def test_deploy_naming_an_unknown_secret_or_key_is_refused(daemon, tmp_path):
    daemon.cli_ok("secret", "set", "known", "present", "--value", "x")
    fn = write_function(tmp_path / "a", "missingsecret", "  DB_PASSWORD: {secret: nosuch, key: password}\n")
    rc, out, err = daemon.cli("deploy", fn)
    assert rc != 0
    assert "secrets.DB_PASSWORD" in err and "nosuch" in err and "apus secret set" in err, err
    fn = write_function(tmp_path / "b", "missingkey", "  DB_PASSWORD: {secret: known, key: absent}\n")
    rc, out, err = daemon.cli("deploy", fn)
    assert rc != 0
    assert "secrets.DB_PASSWORD" in err and "known" in err and "absent" in err, err
    assert daemon.api_call("GET", "/v1/functions/missingkey").status == 404


def test_manifest_errors_name_the_key_path(daemon, tmp_path):
    cases = [
        ("  APUS_X: {secret: db, key: password}\n", "secrets.APUS_X"),
        ("  PLAIN: {secret: db, key: password}\n", "secrets.PLAIN"),  # also in env:
        ("  DB: {secret: db}\n", "secrets.DB.key"),
        ("  DB: {secret: db, key: password, extra: 1}\n", "secrets.DB.extra"),
    ]
    for i, (yaml, path) in enumerate(cases):
        fn = write_function(tmp_path / f"m{i}", "badsecrets", yaml)
        rc, out, err = daemon.cli("deploy", fn)
        assert rc != 0 and path in err, (yaml, err)


def test_setting_needs_the_secrets_scope(daemon):
    def token(name, *scopes):
        r = daemon.api_call("POST", "/v1/tokens", {"name": name, "scopes": list(scopes)})
        assert r.status == 201, r
        return r.json()["secret"]

    reader = token("secrets-reader", "read")
    deployer = token("secrets-deployer", "deploy")
    keeper = token("secrets-keeper", "secrets")
    for who in (reader, deployer):
        r = daemon.api_call("PUT", "/v1/secrets/db/keys/password", {"value": "stolen"}, token=who)
        error = assert_error(r, 403, "forbidden")
        assert "secrets" in error["message"], error
        rc, out, err = daemon.cli("secret", "set", "db", "password", "--value", "stolen", token=who)
        assert rc != 0 and "secrets" in err, err
        r = daemon.api_call("DELETE", "/v1/secrets/db", token=who)
        assert_error(r, 403, "forbidden")
    # A reader lists names and keys; the scope `secrets` sets and deletes.
    r = daemon.api_call("GET", "/v1/secrets", token=reader)
    assert r.status == 200 and "db" in r.text, r
    r = daemon.api_call("PUT", "/v1/secrets/scoped/keys/k", {"value": "by-keeper"}, token=keeper)
    assert r.status == 200, r
    assert "by-keeper" not in r.text
    r = daemon.api_call("DELETE", "/v1/secrets/scoped", token=keeper)
    assert r.status == 204, r


def test_bad_requests_are_refused_clearly(daemon):
    r = daemon.api_call("PUT", "/v1/secrets/Bad%20Name/keys/k", {"value": "v"})
    assert "name" in assert_error(r, 400, "bad_request")["message"]
    r = daemon.api_call("PUT", "/v1/secrets/ok/keys/k", {"valu": "v"})
    assert "value" in assert_error(r, 400, "bad_request")["message"]
    r = daemon.api_call("DELETE", "/v1/secrets/never-set")
    assert_error(r, 404, "not_found")


def test_delete(daemon):
    daemon.cli_ok("secret", "set", "doomed", "a", "--value", "1")
    daemon.cli_ok("secret", "set", "doomed", "b", "--value", "2")
    daemon.cli_ok("secret", "delete", "doomed", "--key", "a")
    listing = daemon.cli_json("secret", "list")
    assert [k["key"] for s in listing["secrets"] if s["name"] == "doomed" for k in s["keys"]] == ["b"], listing
    daemon.cli_ok("secret", "delete", "doomed")
    assert all(s["name"] != "doomed" for s in daemon.cli_json("secret", "list")["secrets"])
    rc, out, err = daemon.cli("secret", "delete", "doomed")
    assert rc != 0 and "doomed" in err


def test_prewarmed_instances_get_secrets_and_never_log_them(tmp_path):
    d = Apusd(tmp_path / "apusd", extra_args=("--log-level", "debug", "--prewarm", "python3=1"))
    try:
        d.start()
        value = fresh_value("warm")
        d.cli_ok("secret", "set", "db", "password", "--value", value)
        fn = write_function(tmp_path / "fn", "warmsecret", "  DB_PASSWORD: {secret: db, key: password}\n")
        d.deploy(fn)
        r = d.get("/warmsecret/")
        assert r.status == 200 and r.json()["DB_PASSWORD"] == value, r
        assert "starting from prewarmed process" in d.cli_ok("logs", "warmsecret")
        assert_nowhere_in_clear(d, value)
    finally:
        d.teardown()


def test_a_wrong_key_file_gives_a_clear_error_never_garbage(tmp_path):
    # Waiting sandbox slots (the default): the environment is written to the slot's pipe.
    d = Apusd(tmp_path / "apusd", extra_args=("--log-level", "debug"))
    try:
        d.start()
        value = fresh_value("sealed")
        d.cli_ok("secret", "set", "db", "password", "--value", value)
        fn = write_function(tmp_path / "fn", "wrongkey", "  DB_PASSWORD: {secret: db, key: password}\n")
        d.deploy(fn)
        r = d.get("/wrongkey/")
        assert r.status == 200 and r.json()["DB_PASSWORD"] == value, r
        assert_nowhere_in_clear(d, value)
        d.stop()
        key = d.data_dir / "secrets.key"
        key.write_bytes(os.urandom(32))
        d.start()
        r = d.get("/wrongkey/")
        assert r.status >= 500, r
        assert value not in r.text
        log = d.log_path.read_text(errors="replace")
        assert "secret db" in log and "password" in log and "secrets.key" in log, d.log_tail()
        assert value not in log
        assert_nowhere_in_clear(d, value)
        # A missing key file is not silently replaced while sealed secrets exist.
        d.stop()
        key.unlink()
        d.start()
        assert not key.exists()
        r = d.get("/wrongkey/")
        assert r.status >= 500, r
        assert "missing" in d.log_path.read_text(errors="replace")
        rc, out, err = d.cli("secret", "set", "db", "other", "--value", "x")
        assert rc != 0 and "secrets.key" in err, err
    finally:
        d.teardown()
