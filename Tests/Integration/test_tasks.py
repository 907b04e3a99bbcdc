"""Asynchronous tasks (issue 6) against real apusd processes: submission from HTTP, the API and the CLI; durable
queueing through kill -9; dispatch beside synchronous traffic; cancellation; retries into the dead-letter list;
callbacks; result limits; bad submissions."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apus_testlib import FUNCTIONS_DIR, Apusd, KeepAliveClient, assert_error, copy_function, http_request

TASKER = FUNCTIONS_DIR / "tasker"
FINAL = {"succeeded", "failed", "cancelled", "timed_out", "expired"}


def raw_exchange(port, request: bytes, timeout=10.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _content_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        return data


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def deploy_tasker(apusd, tmp_path, name, subs=None):
    d = copy_function(TASKER, tmp_path / name, name=name, subs=subs)
    apusd.deploy(d)
    return name


def submit(apusd, function, path="/echo", body=b"", headers=None, expect=202):
    r = apusd.gw("POST", f"/async/{function}{path}", body=body, headers=headers)
    assert r.status == expect, f"submit {function}{path}: expected {expect}, got {r!r}"
    return r


def get_task(apusd, task_id):
    return apusd.api_json("GET", f"/v1/tasks/{task_id}")


def wait_task(apusd, task_id, states=FINAL, timeout=60.0):
    deadline = time.monotonic() + timeout
    task = None
    while time.monotonic() < deadline:
        task = get_task(apusd, task_id)
        if task["state"] in states:
            return task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never reached {sorted(states)} within {timeout:.0f}s; last: {task}")


def counts(apusd, function):
    return apusd.api_json("GET", f"/v1/tasks/counts?function={function}")["states"]


def wait_counts(apusd, function, predicate, timeout=60.0, what="counts"):
    deadline = time.monotonic() + timeout
    c = {}
    while time.monotonic() < deadline:
        c = counts(apusd, function)
        if predicate(c):
            return c
        time.sleep(0.1)
    raise AssertionError(f"{what} for {function} not reached within {timeout:.0f}s; last: {c}")


def all_tasks(apusd, function):
    return apusd.api_json("GET", f"/v1/tasks?function={function}&limit=10000")["tasks"]


# ---------------------------------------------------------------------------------------------------------------


def test_submit_by_header_path_api_and_cli(apusd, deployed):
    name = deployed.fixture("tasker")
    # X-Apus-Invocation: async on an ordinary gateway request.
    r = apusd.gw("POST", f"/{name}/echo?n=1", body=b"from-header", headers={"X-Apus-Invocation": "async"})
    assert r.status == 202, r
    receipt = r.json()
    assert receipt["id"].startswith("t-") and receipt["created"] is True
    assert r.header("Location") == receipt["status_url"] == f"{apusd.api}/v1/tasks/{receipt['id']}"
    assert r.header("X-Apus-Task-Id") == receipt["id"]
    task = wait_task(apusd, receipt["id"])
    assert task["state"] == "succeeded", task
    result = json.loads(task["result"])
    assert result == {"task": receipt["id"], "attempt": 1, "payload": "from-header", "method": "POST", "path": "/echo"}
    assert task["attempts"] == 1 and task["version"] == 1 and task["instance"]
    assert task["durationSeconds"] >= 0 and task["statusCode"] == 200 and task["deadLetter"] is False

    # /async/<function>/... path form, with a chunked body.
    r = apusd.gw("POST", f"/async/{name}/echo", body=b"4\r\nchun\r\n3\r\nked\r\n0\r\n\r\n",
                 headers={"Transfer-Encoding": "chunked"})
    assert r.status == 202, r
    assert json.loads(wait_task(apusd, r.json()["id"])["result"])["payload"] == "chunked"

    # Control API: raw body to /v1/functions/NAME/tasks, JSON to /v1/tasks.
    r = apusd.api_call("POST", f"/v1/functions/{name}/tasks?path=/echo", body=b"via-api")
    assert r.status == 202, r
    assert r.json()["state"] in ("queued", "running", "succeeded")
    assert json.loads(wait_task(apusd, r.json()["id"])["result"])["payload"] == "via-api"
    r = apusd.api_call("POST", "/v1/tasks", body={"function": name, "path": "/echo", "payload": "via-json"})
    assert r.status == 202, r
    assert json.loads(wait_task(apusd, r.json()["id"])["result"])["payload"] == "via-json"

    # CLI: apus submit --wait, apus tasks get / list.
    task_id = apusd.cli_ok("submit", name, "--data", "via-cli", "--path", "/echo").strip()
    assert task_id.startswith("t-")
    done = wait_task(apusd, task_id)
    assert json.loads(done["result"])["payload"] == "via-cli"
    shown = apusd.cli_ok("tasks", "get", task_id)
    assert "state:     succeeded" in shown and "via-cli" in shown
    assert apusd.cli_json("tasks", "get", task_id)["id"] == task_id
    waited = apusd.cli_json("submit", name, "--data", "w", "--path", "/echo", "--wait")
    assert waited["state"] == "succeeded"
    listing = apusd.cli_ok("tasks", "list", "--function", name)
    assert task_id in listing and "succeeded" in listing
    listed = apusd.cli_json("tasks", "list", "--function", name, "--state", "succeeded", "--since", "10m")
    assert task_id in [t["id"] for t in listed["tasks"]]


def test_idempotency_key_returns_the_same_task(apusd, deployed):
    name = deployed.fixture("tasker")
    key = f"order-{time.time_ns()}:v1"
    first = submit(apusd, name, body=b"once", headers={"Idempotency-Key": key})
    again = apusd.gw("POST", f"/async/{name}/echo", body=b"twice", headers={"Idempotency-Key": key})
    assert again.status == 200, again
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    via_api = apusd.api_call("POST", f"/v1/functions/{name}/tasks?path=/echo", body=b"thrice", headers={"Idempotency-Key": key})
    assert via_api.status == 200 and via_api.json()["id"] == first.json()["id"]
    task = wait_task(apusd, first.json()["id"])
    assert json.loads(task["result"])["payload"] == "once"
    assert task["idempotencyKey"] == key


def test_bad_submissions_get_clear_errors(apusd, deployed):
    name = deployed.fixture("tasker")
    r = apusd.gw("POST", "/async/no-such-function/x", body=b"x")
    assert_error(r, 404, "not_found")
    assert "no-such-function" in r.json()["error"]["message"]
    assert_error(apusd.api_call("POST", "/v1/functions/no-such-function/tasks", body=b"x"), 404, "not_found")

    for key in ["has space", "x" * 129, "semi;colon", ""]:
        r = apusd.gw("POST", f"/async/{name}/echo", body=b"x", headers={"Idempotency-Key": key})
        assert_error(r, 400, "bad_request")
        assert "idempotency key" in r.json()["error"]["message"]

    # A payload above the 6 MiB default limit is refused from its Content-Length, before it is read.
    too_big = 6 * 1024 * 1024 + 1
    for port, target in [(apusd.http_port, f"/async/{name}/echo"), (apusd.api_port, f"/v1/functions/{name}/tasks")]:
        # The API takes state-changing calls only with a Host naming it and a token (the gateway needs neither).
        auth = f"Authorization: Bearer {apusd.admin_token}\r\n" if port == apusd.api_port else ""
        data = raw_exchange(port, f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {too_big}\r\n\r\n".encode())
        assert data.split(b" ", 2)[1] == b"413", data
        assert b'"code":"payload_too_large"' in data and b"exceeds the limit" in data, data

    assert_error(apusd.gw("POST", f"/async/{name}/echo", body=b"x", headers={"X-Apus-Priority": "urgent"}), 400, "bad_request")
    r = apusd.gw("POST", f"/async/{name}/echo", body=b"x", headers={"X-Apus-Callback-Url": "ftp://nowhere"})
    assert_error(r, 400, "bad_request")
    assert "X-Apus-Callback-Url" in r.json()["error"]["message"]
    assert_error(apusd.api_call("GET", "/v1/tasks/t-doesnotexist"), 404, "not_found")
    assert_error(apusd.api_call("GET", "/v1/tasks?state=bogus"), 400, "bad_request")
    assert_error(apusd.api_call("GET", "/v1/tasks?since=yesterday-ish"), 400, "bad_request")
    rc, _, err = apusd.cli("submit", "no-such-function", "--data", "x")
    assert rc == 1 and "no-such-function" in err
    # A negative priority is a value, not a flag; out of range, the server says so.
    rc, _, err = apusd.cli("submit", name, "--data", "x", "--path", "/echo", "--priority", "-5000")
    assert rc == 1 and "priority must be an integer from -1000 to 1000 (got \"-5000\")" in err, err
    rc, _, err = apusd.cli("tasks", "list", "--limit", "-1")
    assert rc == 1 and "limit must be 1-10000" in err, err


@pytest.mark.timeout(150)
def test_thousand_tasks_complete_exactly_once(apusd, tmp_path):
    name = deploy_tasker(apusd, tmp_path, "tasker-many")
    client = KeepAliveClient(apusd.gateway)
    ids = {}
    try:
        for i in range(1000):
            r = client.request("POST", f"/async/{name}/echo", body=f"payload-{i}".encode())
            assert r.status == 202, r
            ids[r.json()["id"]] = f"payload-{i}"
    finally:
        client.close()
    assert len(ids) == 1000, "every submission got its own id"
    wait_counts(apusd, name, lambda c: c.get("succeeded", 0) + c.get("failed", 0) >= 1000, timeout=120, what="1000 finished")
    tasks = all_tasks(apusd, name)
    assert len(tasks) == 1000
    outcomes = {}
    for task in tasks:
        assert task["state"] == "succeeded", task
        assert task["attempts"] == 1, task
        result = json.loads(task["result"])
        assert result["task"] == task["id"]
        assert result["payload"] == ids[task["id"]], "each task ran with its own payload"
        outcomes[task["id"]] = result["payload"]
    assert sorted(outcomes) == sorted(ids), "exactly the submitted tasks, each once"
    assert counts(apusd, name) == {"succeeded": 1000}


@pytest.mark.timeout(120)
def test_long_task_beside_synchronous_calls(apusd, deployed):
    name = deployed.fixture("tasker")
    task_id = submit(apusd, name, path="/sleep?s=30").json()["id"]
    wait_task(apusd, task_id, states={"running"})
    client = KeepAliveClient(apusd.gateway)
    sync_ok = 0
    progress_seen = None
    started = time.monotonic()
    try:
        while time.monotonic() - started < 31:
            r = client.request("POST", f"/{name}/echo", body=b"sync")
            assert r.status == 200, f"a synchronous call failed while the task ran: {r!r}"
            sync_ok += 1
            task = get_task(apusd, task_id)
            if task["state"] != "running":
                break
            if task.get("progress") is not None:
                progress_seen = task
            time.sleep(0.25)
    finally:
        client.close()
    done = wait_task(apusd, task_id, timeout=30)
    assert done["state"] == "succeeded", done
    assert done["durationSeconds"] >= 29
    assert sync_ok >= 50

    via_module = wait_task(apusd, submit(apusd, name, path="/module").json()["id"])
    assert json.loads(via_module["result"]) == {"continue": True}
    assert via_module["progress"] == 0.25 and via_module["progressMessage"] == "via the apus module"
    assert progress_seen is not None and 0 < progress_seen["progress"] <= 1 and progress_seen["progressMessage"].startswith("slept")


def test_cancel_queued_and_running_tasks(apusd, tmp_path):
    name = deploy_tasker(apusd, tmp_path, "tasker-cancel", subs=[(r"concurrency: 10", "concurrency: 1")])
    running = submit(apusd, name, path="/cooperate").json()["id"]
    queued = submit(apusd, name, path="/echo").json()["id"]
    wait_task(apusd, running, states={"running"})
    assert get_task(apusd, queued)["state"] == "queued", "budget of one: the second task waits"

    r = apusd.api_call("DELETE", f"/v1/tasks/{queued}")
    assert r.status == 200 and r.json()["state"] == "cancelled", r

    out = apusd.cli_ok("tasks", "cancel", running)
    assert "cancelling" in out
    done = wait_task(apusd, running, timeout=10)
    assert done["state"] == "cancelled", done
    assert "cancelled while running" in done["error"]
    assert_error(apusd.api_call("DELETE", f"/v1/tasks/{running}"), 409, "conflict")


def test_cancel_running_task_that_ignores_it_replaces_instance(apusd, tmp_path):
    name = deploy_tasker(apusd, tmp_path, "tasker-ignore")
    task_id = submit(apusd, name, path="/ignore").json()["id"]
    running = wait_task(apusd, task_id, states={"running"})
    deadline = time.monotonic() + 10
    while not running.get("instance") and time.monotonic() < deadline:
        time.sleep(0.1)
        running = get_task(apusd, task_id)
    instance = running["instance"]
    assert instance
    assert apusd.api_call("DELETE", f"/v1/tasks/{task_id}").status == 202
    done = wait_task(apusd, task_id, timeout=20)
    assert done["state"] == "cancelled", done
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ids = [i["id"] for i in apusd.api_json("GET", f"/v1/functions/{name}/instances")["instances"]]
        if instance not in ids:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"instance {instance} that ignored the cancellation is still in service: {ids}")
    # The function still serves.
    assert apusd.gw("POST", f"/{name}/echo", body=b"after").status == 200


def test_crashing_function_exhausts_retries_into_dead_letter(apusd, tmp_path):
    name = deploy_tasker(apusd, tmp_path, "tasker-crash")
    task_id = submit(apusd, name, path="/crash").json()["id"]
    done = wait_task(apusd, task_id, timeout=60)
    assert done["state"] == "failed", done
    assert done["attempts"] == 3, "retries: 2 → three attempts"
    assert "retries exhausted" in done["error"] and "closed the connection before answering" in done["error"]
    assert done["deadLetter"] is True
    dead = apusd.api_json("GET", f"/v1/tasks/dead-letter?function={name}")["tasks"]
    assert [t["id"] for t in dead] == [task_id]
    assert apusd.api_json("GET", f"/v1/tasks?function={name}&state=dead")["tasks"][0]["id"] == task_id
    assert task_id in apusd.cli_ok("tasks", "dead-letter", "--function", name)

    # A failure on the first attempt only: retried, and succeeds with the attempt number passed on.
    retried = wait_task(apusd, submit(apusd, name, path="/fail-once").json()["id"], timeout=30)
    assert retried["state"] == "succeeded" and retried["attempts"] == 2
    assert json.loads(retried["result"]) == {"attempt": 2}


def test_result_larger_than_limit_fails_clearly(apusd, deployed):
    name = deployed.fixture("tasker")
    task = wait_task(apusd, submit(apusd, name, path=f"/big?bytes={2 * 1024 * 1024}").json()["id"])
    assert task["state"] == "failed", task
    assert "result exceeds the task result limit" in task["error"] and task["attempts"] == 1
    small = wait_task(apusd, submit(apusd, name, path="/big?bytes=1000").json()["id"])
    assert small["state"] == "succeeded" and small["result"] == "x" * 1000


def serve_hook(handler) -> tuple[ThreadingHTTPServer, str]:
    """A real HTTP server on loopback with `handler`, serving in a thread; returns it and its /hook URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


class CallbackSink:
    """A real HTTP server that records callback POSTs; fails the first `fail_first` of them with 503."""

    def __init__(self, fail_first=0):
        self.received = []
        self.failures_left = fail_first
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if sink.failures_left > 0:
                    sink.failures_left -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sink.received.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server, self.url = serve_hook(Handler)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_callback_receives_the_outcome_with_retries(apusd, deployed):
    name = deployed.fixture("tasker")
    sink = CallbackSink(fail_first=1)
    try:
        task_id = submit(apusd, name, body=b"cb", headers={"X-Apus-Callback-Url": sink.url}).json()["id"]
        deadline = time.monotonic() + 20
        while not sink.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sink.received, "no callback arrived"
        path, headers, body = sink.received[0]
        assert path == "/hook" and headers.get("X-Apus-Task-Id") == task_id
        assert body["id"] == task_id and body["state"] == "succeeded"
        assert json.loads(body["result"])["payload"] == "cb"
        deadline = time.monotonic() + 5
        while get_task(apusd, task_id).get("callbackState") != "delivered" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get_task(apusd, task_id)["callbackState"] == "delivered"
    finally:
        sink.close()


class RedirectingSink:
    """Answers every POST with a 307 redirect to `target` (another sink): a redirect must not be followed."""

    def __init__(self, target: str):
        self.hits = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.hits += 1
                self.send_response(307)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server, self.url = serve_hook(Handler)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(120)
def test_callbacks_to_this_node_are_refused_by_default(tmp_path):
    """SSRF: an anonymous caller may not make apusd POST to the node's own services. Without --callback-allow,
    loopback, link-local (the cloud metadata address) and unspecified addresses are refused at submission with the
    reason, and a host name that resolves to loopback is refused at delivery (the callback fails, nothing is sent)."""
    d = Apusd(tmp_path / "apusd", extra_args=("--callback-allow", "203.0.113.7"))  # not loopback: the default holds
    sink = CallbackSink()
    try:
        d.start()
        name = deploy_tasker(d, tmp_path, "tasker-ssrf")
        for url in (sink.url, "http://127.1.2.3:9/admin", "http://[::1]:7070/v1/functions",
                    "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0:7070/", "http://localhost:9/x"):
            r = submit(d, name, body=b"x", headers={"X-Apus-Callback-Url": url}, expect=400)
            message = r.json()["error"]["message"]
            assert "callback" in message and "--callback-allow" in message, (url, message)
        # A name that is not an address literal is judged when the callback is sent, by what it resolves to: this
        # machine's own host name resolves to loopback or to one of its interfaces, both refused.
        hostname = socket.gethostname()
        try:
            socket.getaddrinfo(hostname, None)
        except OSError:
            pytest.skip(f"this machine's host name {hostname!r} does not resolve")
        task_id = submit(d, name, body=b"x", headers={"X-Apus-Callback-Url": f"http://{hostname}:{sink.url.rsplit(':', 1)[1]}"}).json()["id"]
        wait_task(d, task_id)
        deadline = time.monotonic() + 10
        while get_task(d, task_id).get("callbackState") not in ("failed", "delivered") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get_task(d, task_id).get("callbackState") == "failed", get_task(d, task_id)
        assert not sink.received, f"apusd called back to loopback: {sink.received}"
        assert "task callback refused" in d.log_tail(200)
    finally:
        sink.close()
        d.teardown()


def test_callback_redirects_are_not_followed(apusd, deployed):
    """An allowed callback host that redirects elsewhere (here: to another loopback sink) is not followed."""
    name = deployed.fixture("tasker")
    target = CallbackSink()
    redirect = RedirectingSink(target.url)
    try:
        task_id = submit(apusd, name, body=b"r", headers={"X-Apus-Callback-Url": redirect.url}).json()["id"]
        deadline = time.monotonic() + 20
        while redirect.hits == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert redirect.hits >= 1, "the callback never reached the redirecting host"
        time.sleep(1.5)
        assert not target.received, "the callback followed a redirect"
    finally:
        target.close()
        redirect.close()


@pytest.mark.timeout(180)
def test_kill9_with_500_queued_and_10_running_all_finish(fresh_apusd, tmp_path):
    d = fresh_apusd
    name = deploy_tasker(d, tmp_path, "tasker-durable")
    # The long tasks run long enough that none finishes while the 500 are submitted.
    long_ids = [submit(d, name, path="/sleep?s=8", body=f"long-{i}".encode()).json()["id"] for i in range(10)]
    wait_counts(d, name, lambda c: c.get("running", 0) == 10, timeout=30, what="10 running")
    client = KeepAliveClient(d.gateway)
    short_ids = []
    try:
        for i in range(500):
            r = client.request("POST", f"/async/{name}/echo", body=f"short-{i}".encode())
            assert r.status == 202, r
            short_ids.append(r.json()["id"])
    finally:
        client.close()
    c = counts(d, name)
    assert c.get("running") == 10 and c.get("queued") == 500, f"expected 10 running and 500 queued before the kill, got {c}"

    d.kill()  # SIGKILL apusd (and its orphaned instances): no chance to write anything more
    d.start()
    c = wait_counts(d, name, lambda c: c.get("succeeded", 0) == 510, timeout=120, what="510 succeeded")
    assert c == {"succeeded": 510}
    tasks = {t["id"]: t for t in all_tasks(d, name)}
    assert sorted(tasks) == sorted(long_ids + short_ids), "every accepted task is still there"
    for task_id in long_ids:
        result = json.loads(tasks[task_id]["result"])
        assert tasks[task_id]["attempts"] == 2 and result["attempt"] == 2, "interrupted tasks ran again as attempt 2"
    for task_id in short_ids:
        assert tasks[task_id]["attempts"] == 1
        assert json.loads(tasks[task_id]["result"])["task"] == task_id


def task_result_bytes(task) -> bytes:
    if task.get("resultBase64") is not None:
        return base64.b64decode(task["resultBase64"])
    return (task.get("result") or "").encode("utf-8")


def test_grpc_metadata_submit_and_api_submit(apusd, deployed):
    import grpc
    from grpc_support import ECHO_FUNCTION, echo_pb2, echo_pb2_grpc

    deployed.example(ECHO_FUNCTION)
    key = f"grpc-{time.time_ns()}"
    with grpc.insecure_channel(f"127.0.0.1:{apusd.http_port}") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        metadata = [("apus-invocation", "async"), ("apus-idempotency-key", key)]
        response, call = stub.Get.with_call(echo_pb2.EchoRequest(text="later"), metadata=metadata, timeout=10)
        assert response == echo_pb2.EchoResponse(), "an async call answers with an empty message"
        initial = dict(call.initial_metadata())
        task_id = initial["apus-task-id"]
        assert initial["apus-task-status-url"] == f"{apusd.api}/v1/tasks/{task_id}"
        assert initial["apus-task-created"] == "true"
        _, again = stub.Get.with_call(echo_pb2.EchoRequest(text="again"), metadata=metadata, timeout=10)
        assert dict(again.initial_metadata())["apus-task-id"] == task_id
        assert dict(again.initial_metadata())["apus-task-created"] == "false"
        with pytest.raises(grpc.RpcError) as bad:
            stub.Get(echo_pb2.EchoRequest(text="x"), metadata=[("apus-invocation", "async"), ("apus-idempotency-key", "no spaces")], timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "idempotency key" in bad.value.details()
    task = wait_task(apusd, task_id)
    assert task["state"] == "succeeded" and task["kind"] == "grpc" and task["method"] == "/echo.Echo/Get", task
    assert echo_pb2.EchoResponse.FromString(task_result_bytes(task)).text == "later"

    # The control API takes the serialized request message as the body and the method as a parameter.
    body = echo_pb2.EchoRequest(text="via-api").SerializeToString()
    r = apusd.api_call("POST", f"/v1/functions/{ECHO_FUNCTION}/tasks?method=/echo.Echo/Get", body=body)
    assert r.status == 202, r
    task = wait_task(apusd, r.json()["id"])
    assert echo_pb2.EchoResponse.FromString(task_result_bytes(task)).text == "via-api"
    r = apusd.api_call("POST", f"/v1/functions/{ECHO_FUNCTION}/tasks?method=/other.Service/Get", body=body)
    assert_error(r, 400, "bad_request")
    assert "/<service>/<method>" in r.json()["error"]["message"]


def test_http2_submit(apusd, deployed, tmp_path):
    import subprocess

    name = deployed.fixture("tasker")
    head_file = tmp_path / "head"
    p = subprocess.run(["curl", "-sS", "--max-time", "30", "--http2-prior-knowledge", "-D", str(head_file),
                        "-H", "X-Apus-Invocation: async", "--data-binary", "over-h2", f"{apusd.gateway}/{name}/echo"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    head = head_file.read_text()
    assert head.startswith("HTTP/2 202"), head
    receipt = json.loads(p.stdout)
    assert f"location: {receipt['status_url']}" in head.lower().replace("\r", "")
    assert json.loads(wait_task(apusd, receipt["id"])["result"])["payload"] == "over-h2"
    p = subprocess.run(["curl", "-sS", "--max-time", "30", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                        "--data-binary", "x", f"{apusd.gateway}/async/no-such-function/"], capture_output=True, text=True, timeout=60)
    assert p.stdout == "404", p


def test_timeouts_and_lost_heartbeats_are_retried_then_final(apusd, tmp_path):
    slow = deploy_tasker(apusd, tmp_path, "tasker-timeout", subs=[(r"timeout: 2m", "timeout: 1s"), (r"retries: 2", "retries: 1")])
    silent = deploy_tasker(apusd, tmp_path, "tasker-silent", subs=[(r"retries: 2", "retries: 1\n  heartbeat: 2s")])
    timed = submit(apusd, slow, path="/sleep?s=5").json()["id"]
    lost = submit(apusd, silent, path="/ignore").json()["id"]
    beating = submit(apusd, silent, path="/sleep?s=3").json()["id"]  # reports progress every second

    done = wait_task(apusd, timed, timeout=30)
    assert done["state"] == "timed_out" and done["attempts"] == 2, done
    assert "timed out after async.timeout of 1s" in done["error"] and done["deadLetter"] is True
    done = wait_task(apusd, lost, timeout=30)
    assert done["state"] == "failed" and done["attempts"] == 2, done
    assert "lost: no progress report" in done["error"]
    done = wait_task(apusd, beating, timeout=30)
    assert done["state"] == "succeeded" and done["attempts"] == 1, done


def test_openapi_document_is_valid():
    validator = pytest.importorskip("openapi_spec_validator")
    import yaml

    from apus_testlib import REPO_ROOT

    spec = yaml.safe_load((REPO_ROOT / "IDL" / "apus-api.openapi.yaml").read_text())
    validator.validate(spec)
    for path in ["/v1/tasks", "/v1/tasks/{id}", "/v1/tasks/dead-letter", "/v1/functions/{name}/tasks", "/v1/tasks/{id}/progress"]:
        assert path in spec["paths"], path


def test_task_metrics_on_the_prometheus_endpoint(apusd, deployed):
    name = deployed.fixture("tasker")
    wait_task(apusd, submit(apusd, name).json()["id"])
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        r = apusd.api_call("GET", "/metrics")
        if r.status == 404:
            pytest.skip("this apusd has no /metrics endpoint")
        text = r.text
        if f'apus_tasks_queued{{function="{name}"}}' in text:
            break
        time.sleep(0.2)
    for family in ["apus_tasks_submitted_total", "apus_tasks_completed_total", "apus_tasks_queued", "apus_tasks_running",
                   "apus_tasks_oldest_queued_age_seconds"]:
        assert f"# HELP {family} " in text, f"{family} missing from /metrics"
    assert f'apus_tasks_completed_total{{function="{name}",outcome="succeeded"}}' in text
    assert f'apus_tasks_queued{{function="{name}"}}' in text


def test_priority_order_and_max_age_expiry(apusd, tmp_path):
    name = deploy_tasker(apusd, tmp_path, "tasker-order", subs=[(r"concurrency: 10", "concurrency: 1")])
    blocker = submit(apusd, name, path="/sleep?s=2").json()["id"]
    wait_task(apusd, blocker, states={"running"})
    low = submit(apusd, name, body=b"low").json()["id"]
    high = submit(apusd, name, body=b"high", headers={"X-Apus-Priority": "5"}).json()["id"]
    later_low = submit(apusd, name, body=b"low-2").json()["id"]
    tasks = {t: wait_task(apusd, t) for t in (blocker, low, high, later_low)}
    assert all(t["state"] == "succeeded" for t in tasks.values()), tasks
    started = sorted((low, high, later_low), key=lambda t: (tasks[t]["startedAt"], tasks[t]["queueSeconds"]))
    assert tasks[high]["startedAt"] <= tasks[low]["startedAt"] <= tasks[later_low]["startedAt"], started
    assert tasks[high]["queueSeconds"] < tasks[low]["queueSeconds"], "the higher priority started first"
    assert tasks[high]["priority"] == 5

    short = deploy_tasker(apusd, tmp_path, "tasker-expiry", subs=[(r"concurrency: 10", "concurrency: 1\n  max_age: 1s")])
    submit(apusd, short, path="/sleep?s=4")
    waiting = submit(apusd, short).json()["id"]
    done = wait_task(apusd, waiting, timeout=15)
    assert done["state"] == "expired" and done["attempts"] == 0 and done["deadLetter"] is True, done
    assert "async.max_age of 1s" in done["error"]


def test_graceful_restart_interrupts_and_reruns_running_tasks(fresh_apusd, tmp_path):
    d = fresh_apusd
    name = deploy_tasker(d, tmp_path, "tasker-restart")
    running = submit(d, name, path="/sleep?s=3").json()["id"]
    wait_task(d, running, states={"running"})
    rc = d.restart()
    assert rc == 0, f"apusd exited {rc} after SIGTERM"
    assert get_task(d, running)["state"] in ("queued", "running"), "an interrupted attempt is not an outcome"
    done = wait_task(d, running, timeout=30)
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    assert json.loads(done["result"])["attempt"] == 2
