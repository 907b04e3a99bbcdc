"""Thrift oneway calls to a function with `async:` in its manifest become tasks (issue 6). Runs under Debian's
python3 (its python3-thrift builds the calls), like test_thrift.py."""

from __future__ import annotations

import random
import time

import pytest

from apus_testlib import apusd_has_option, copy_function, wait_for_log
from thrift_support import CALCULATOR_DIR, Calculator, RawConnection, call_bytes

pytestmark = pytest.mark.skipif(not apusd_has_option("--thrift-port"), reason="apusd has no --thrift-port")


def wait_tasks(apusd, function, count, timeout=30.0):
    deadline = time.monotonic() + timeout
    tasks = []
    while time.monotonic() < deadline:
        tasks = apusd.api_json("GET", f"/v1/tasks?function={function}")["tasks"]
        if len(tasks) >= count and all(t["state"] not in ("queued", "running") for t in tasks):
            return tasks
        time.sleep(0.1)
    raise AssertionError(f"{count} finished tasks of {function} expected within {timeout:.0f}s; got {tasks}")


@pytest.mark.parametrize("instance_transport,client_transport", [("framed", "framed"), ("header", "header"), ("buffered", "framed")])
def test_thrift_oneway_to_async_function_becomes_a_task(apusd, deployed, instance_transport, client_transport):
    name = f"calc-async-{instance_transport}"
    service = f"CalcAsync{instance_transport.capitalize()}"
    deployed(copy_function(CALCULATOR_DIR, deployed.scratch / name, name=name, subs=[
        (r"^  service: Calculator$", f"  service: {service}"),
        (r"^  transport: framed$", f"  transport: {instance_transport}"),
        (r"^  (#.*|methods:.*)\n", ""),
        (r"^concurrency: 50$", "concurrency: 50\nasync: {concurrency: 2, retries: 1}"),
    ]))
    zap_id = random.randrange(1, 2 ** 31)
    conn = RawConnection(apusd.host, apusd.thrift_port, transport=client_transport)
    try:
        conn.send(call_bytes("zap", Calculator.zap_args(zap_id), seqid=1, oneway=True, service=service, transport=client_transport))
        # A plain call on the same connection is answered as usual (the oneway call sent nothing back).
        conn.send(call_bytes("add", Calculator.add_args(20, 22), seqid=2, service=service, transport=client_transport))
        reply = conn.read_reply()
        assert (reply.seqid, reply.success) == (2, 42), reply
    finally:
        conn.sock.close()
    tasks = wait_tasks(apusd, name, 1)
    assert len(tasks) == 1, tasks
    task = tasks[0]
    assert task["state"] == "succeeded" and task["kind"] == "thrift" and task["method"] == "zap", task
    wait_for_log(apusd, name, f"zap {zap_id}")
