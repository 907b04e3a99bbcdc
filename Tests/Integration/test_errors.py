"""Errors, logs and deletion."""

import json
import subprocess
import time
import uuid

from apus_testlib import EXAMPLES_DIR, LOG_LINE_RE, assert_error, copy_function


def test_unknown_function_is_404_json(apusd):
    assert_error(apusd.get("/nosuch/"), 404, "not_found")
    assert_error(apusd.get("/nosuch/deep/path?x=1"), 404, "not_found")
    assert_error(apusd.get("/", headers={"Host": "nosuch.apus.localhost"}), 404, "not_found")
    assert_error(apusd.api_call("GET", "/v1/functions/nosuch"), 404, "not_found")
    assert_error(apusd.api_call("GET", "/v1/functions/nosuch/versions"), 404, "not_found")
    assert_error(apusd.api_call("DELETE", "/v1/functions/nosuch"), 404, "not_found")


def test_unknown_version_is_404(apusd, deployed):
    deployed.example("hello-python")
    assert_error(apusd.api_call("GET", "/v1/functions/hello-python/versions/99"), 404, "not_found")


def test_cli_get_unknown_function(apusd):
    rc, out, err = apusd.cli("get", "nosuch")
    assert rc == 1, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {err!r}"
    assert lines[0].startswith("apus: error: ") and "nosuch" in lines[0], lines[0]


def test_cli_invoke_error_status_exits_1(apusd):
    rc, out, err = apusd.cli("invoke", "nosuch")
    assert rc == 1, (rc, out, err)


def test_cli_unreachable_api(apusd):
    try:
        rc, out, err = apusd.cli("list", api="http://127.0.0.1:9", timeout=15)  # discard port: nothing listens
    except subprocess.TimeoutExpired:
        raise AssertionError("`apus list` against a refused connection hung for 15 s instead of failing") from None
    assert rc == 1, (rc, out, err)
    assert err.startswith("apus: error: ") and len(err.splitlines()) == 1, err


def test_logs_show_function_output(apusd, deployed):
    deployed.example("hello-python")
    marker = "LogMark" + uuid.uuid4().hex[:8]
    r = apusd.get(f"/hello-python/logged?name={marker}")
    assert r.status == 200, r

    needle = f"greeting '{marker}' (GET /logged, request "
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline:
        out = apusd.cli_ok("logs", "hello-python")
        if needle in out:
            break
        time.sleep(0.3)
    lines = [line for line in out.splitlines() if needle in line]
    assert lines, f"the function's print() is not in `apus logs hello-python`:\n{out}"
    m = LOG_LINE_RE.match(lines[0])
    assert m, f"log line format is not `<ts> v<N> <instance> <stream>| text`: {lines[0]!r}"
    assert m.group("version") == "1" and m.group("stream") == "stdout"
    assert m.group("text").startswith(f"greeting '{marker}'")
    assert r.header("X-Apus-Request-Id") in m.group("text"), "the request id given to the handler differs"

    # The API serves the same text; tail limits it.
    api = apusd.api_call("GET", "/v1/functions/hello-python/logs?tail=200")
    assert api.status == 200 and api.header("Content-Type", "").startswith("text/plain"), api
    assert needle in api.text
    tail1 = apusd.api_call("GET", "/v1/functions/hello-python/logs?tail=1")
    assert len(tail1.text.strip().splitlines()) == 1, tail1.text
    out = apusd.cli_ok("logs", "hello-python", "--tail", "1")
    assert len(out.strip().splitlines()) == 1, out


def test_bad_log_tail_is_refused_and_apusd_stays_up(apusd, deployed):
    deployed.example("hello-python")
    assert apusd.gw("GET", "/hello-python/").status == 200  # an instance ran: the function has a log file
    for tail in ("-5", "abc", "99999999999999999"):  # the last one used to overflow the log window (a crash)
        r = apusd.api_call("GET", f"/v1/functions/hello-python/logs?tail={tail}")
        assert_error(r, 400, "bad_request")
        assert f'tail must be 0-100000 (got "{tail}")' in r.json()["error"]["message"]
    rc, _, err = apusd.cli("logs", "hello-python", "--tail", "-5")  # a value, not a flag
    assert rc == 1 and 'tail must be 0-100000 (got "-5")' in err, err
    rc, _, err = apusd.cli("scale", "hello-python", "--min", "-1")
    assert rc == 1 and "scale.min: must be 0...1000 (got -1)" in err, err
    assert apusd.api_call("GET", "/v1/functions/hello-python/logs?tail=0").status == 200


def test_delete_removes_function_and_route(apusd, tmp_path):
    func_dir = copy_function(EXAMPLES_DIR / "hello-python", tmp_path / "doomed", name="doomed")
    apusd.deploy(func_dir)
    r = apusd.get("/doomed/?name=D")
    assert r.status == 200 and r.json()["message"] == "Hello, D!", r

    out = apusd.cli_ok("delete", "doomed")
    assert_error(apusd.get("/doomed/?name=D"), 404, "not_found")
    assert_error(apusd.get("/", headers={"Host": "doomed.apus.localhost"}), 404, "not_found")
    assert_error(apusd.api_call("GET", "/v1/functions/doomed"), 404, "not_found")
    names = [f["name"] for f in apusd.api_json("GET", "/v1/functions")["functions"]]
    assert "doomed" not in names
    rc, out, err = apusd.cli("delete", "doomed")
    assert rc == 1 and err.startswith("apus: error: "), (rc, out, err)

    # The name can be used again and starts over at version 1.
    apusd.deploy(func_dir)
    doc = apusd.api_json("GET", "/v1/functions/doomed")
    assert doc["latestVersion"] == 1 and len(doc["versions"]) == 1, json.dumps(doc)
    r = apusd.api_call("DELETE", "/v1/functions/doomed")
    assert r.status == 204 and r.body == b"", r
