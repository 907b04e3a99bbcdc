"""The runtime contract seen from inside an instance: environment, and (with bwrap) the sandbox."""

import json
import os
import urllib.parse
from pathlib import Path

import pytest


def test_instance_environment(apusd, deployed):
    deployed.fixture("envdump")
    r = apusd.get("/envdump/")
    assert r.status == 200, r
    env = r.json()
    assert env.get("APUS_PORT", "").isdigit() and 0 < int(env["APUS_PORT"]) < 65536, env
    assert env.get("APUS_FUNCTION") == "envdump", env
    assert env.get("APUS_VERSION") == "1", env
    assert env.get("APUS_PROTOCOL") == "http", env
    assert env.get("APUS_INSTANCE"), env
    assert env.get("APUS_HANDLER") == "main.handler", env
    assert env.get("FOO") == "bar", env
    # The instance port is not one of apusd's own listeners.
    assert int(env["APUS_PORT"]) not in (apusd.api_port, apusd.http_port)
    # The control API lists the same instance, with the fields of the spec.
    instances = apusd.api_json("GET", "/v1/functions/envdump/instances")["instances"]
    [inst] = [i for i in instances if i["id"] == env["APUS_INSTANCE"]] or [None]
    assert inst is not None, (env["APUS_INSTANCE"], instances)
    missing = {"id", "version", "state", "port", "inFlight", "pid", "startedAt"} - set(inst)
    assert not missing, f"instance lacks {sorted(missing)}: {inst}"
    assert inst["port"] == int(env["APUS_PORT"]) and inst["version"] == 1, inst
    assert isinstance(inst["pid"], int) and inst["pid"] > 0, inst


@pytest.fixture(scope="module")
def sandboxed(apusd):
    kind = apusd.info.get("sandbox")
    if kind != "bwrap":
        pytest.skip(f"GET /v1/info reports sandbox={kind!r}, not 'bwrap' (bubblewrap missing or unusable here): "
                    "the sandbox checks only apply to bwrap")
    return apusd


def snoop(apusd, path=None):
    query = "" if path is None else "?" + urllib.parse.urlencode({"path": str(path)})
    r = apusd.get(f"/snoop/{query}")
    assert r.status == 200, r
    return r.json()


def test_sandbox_cwd_is_read_only_code(sandboxed, deployed):
    deployed.fixture("snoop")
    doc = snoop(sandboxed)
    assert doc["cwd"] == "/code", doc
    code = snoop(sandboxed, "/code")
    assert code["exists"] is True, code
    assert "main.py" in code["listing"] and "apus.yaml" in code["listing"], code


def test_sandbox_tmp_is_private(sandboxed, deployed):
    deployed.fixture("snoop")
    tmp = snoop(sandboxed, "/tmp")
    assert tmp["exists"] is True and tmp["listing"] == [], f"/tmp in the sandbox is not empty/private: {tmp}"


def test_sandbox_hides_data_dir_and_other_functions(sandboxed, deployed):
    deployed.fixture("snoop")
    deployed.example("hello-python")  # another function whose code must stay out of sight
    data_dir = sandboxed.data_dir.resolve()

    # Everything under <data-dir>/code as the test process sees it (a few levels deep), plus the data dir itself,
    # its parent, ports.json and the apusd log next to it.
    paths = [data_dir, data_dir / "code", data_dir / "ports.json", data_dir.parent, sandboxed.log_path]
    code_root = data_dir / "code"
    if code_root.is_dir():
        for root, dirs, files in os.walk(code_root):
            depth = len(Path(root).relative_to(code_root).parts)
            paths.extend(Path(root) / n for n in dirs + files)
            if depth >= 2:
                dirs[:] = []
    code_files = [p for p in paths if p.name in ("main.py", "apus.yaml")][:40]  # other functions' code
    assert len(paths) < 1000

    visible = []
    for p in paths[:40] + code_files:
        doc = snoop(sandboxed, p)
        if doc["exists"] is not False or doc["listing"] is not None or doc["readable"] is not False:
            visible.append(doc)
    assert not visible, "the sandbox sees host paths of the data dir:\n" + "\n".join(json.dumps(v) for v in visible)
