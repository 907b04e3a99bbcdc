"""Deploy archives as an attacker writes them: a gzip bomb, too many entries, an oversized apus.yaml, device
nodes, FIFOs and `..` names are refused at upload, naming what was wrong, before anything is kept; code no
version refers to is removed when its function is deleted; the data directory and its databases are apusd's alone.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zlib

import pytest

from apus_testlib import assert_error

MANIFEST = b"name: %s\nruntime: python3\n"
HANDLER = b"def handler(event, context):\n    return {'ok': True}\n"


def archive(entries) -> bytes:
    """A tar.gz of `entries`: (TarInfo, bytes or None) pairs, written as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"", kind=tarfile.REGTYPE, **fields) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, (data if kind == tarfile.REGTYPE else None)


def function_entries(name: str) -> list:
    return [member("./apus.yaml", MANIFEST % name.encode()), member("./main.py", HANDLER)]


def upload(apusd, body: bytes):
    return apusd.api_call("POST", "/v1/functions", body=body, headers={"Content-Type": "application/gzip"}, timeout=60)


def assert_not_created(apusd, name: str):
    assert apusd.api_call("GET", f"/v1/functions/{name}").status == 404, f"{name} was created"


class ZeroStream(io.RawIOBase):
    """`size` zero bytes, read in pieces (a large member without holding it in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def bomb(name: str, size: int) -> bytes:
    """An archive whose one large member of zeros compresses about a thousandfold."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        for info, data in function_entries(name):
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("./zeros.bin")
        info.size = size
        tar.addfile(info, io.BufferedReader(ZeroStream(size), buffer_size=1 << 20))
    return buf.getvalue()


def test_gzip_bomb_is_refused_at_its_header(apusd):
    body = bomb("bomb", 600 << 20)  # 600 MiB of zeros; the default limit is 512Mi unpacked
    assert len(body) < 2 << 20, len(body)
    r = upload(apusd, body)
    err = assert_error(r, 413, "payload_too_large")
    assert "unpacks to more than 512Mi" in err["message"] and "zeros.bin" in err["message"], err
    assert_not_created(apusd, "bomb")


def test_too_many_entries_are_refused(apusd):
    entries = function_entries("many") + [member(f"./f{i}", b"x") for i in range(20_001)]
    err = assert_error(upload(apusd, archive(entries)), 413, "payload_too_large")
    assert "more than 20000 entries" in err["message"], err
    assert_not_created(apusd, "many")


def test_oversized_manifest_is_refused_before_it_is_read(apusd):
    manifest = MANIFEST % b"bigyaml" + b"# " + b"x" * (100 << 10) + b"\n"
    err = assert_error(upload(apusd, archive([member("./apus.yaml", manifest), member("./main.py", HANDLER)])), 413, "payload_too_large")
    assert "apus.yaml is" in err["message"] and "the limit is 64Ki" in err["message"], err
    assert_not_created(apusd, "bigyaml")


@pytest.mark.parametrize("kind,fields,word", [
    (tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}, "device node"),
    (tarfile.BLKTYPE, {"devmajor": 7, "devminor": 0}, "device node"),
    (tarfile.FIFOTYPE, {}, "FIFO"),
], ids=["char-device", "block-device", "fifo"])
def test_special_files_are_refused_naming_the_member(apusd, kind, fields, word):
    entries = function_entries("special") + [member("./dev/evil", kind=kind, **fields)]
    err = assert_error(upload(apusd, archive(entries)), 400, "bad_request")
    assert "./dev/evil" in err["message"] and word in err["message"], err
    assert_not_created(apusd, "special")


@pytest.mark.parametrize("name", ["../escape.py", "./a/../../escape.py", "/etc/cron.d/evil"])
def test_names_outside_the_function_folder_are_refused(apusd, name):
    entries = function_entries("outside") + [member(name, b"print('x')\n")]
    err = assert_error(upload(apusd, archive(entries)), 400, "bad_request")
    assert "outside the function folder" in err["message"], err
    assert_not_created(apusd, "outside")


def test_a_proper_archive_still_deploys_and_serves(apusd):
    r = upload(apusd, archive(function_entries("archive-ok")))
    assert r.status == 201, r
    assert apusd.get("/archive-ok/").json() == {"ok": True}


def test_deleted_functions_code_is_collected(apusd):
    r = upload(apusd, archive(function_entries("collected") + [member("./marker.txt", b"collected-%d" % os.getpid())]))
    assert r.status == 201, r
    digest = r.json()["version"]["codeDigest"].split(":", 1)[1]
    code = apusd.data_dir / "code"
    blob, unpacked = code / "blobs" / "sha256" / f"{digest}.tar.gz", code / "unpacked" / digest
    assert blob.exists() and unpacked.is_dir(), (blob, unpacked)
    # Another function's code is not touched by the collection.
    kept = upload(apusd, archive(function_entries("kept")))
    assert kept.status == 201, kept
    kept_digest = kept.json()["version"]["codeDigest"].split(":", 1)[1]
    assert apusd.api_call("DELETE", "/v1/functions/collected").status in (200, 204)
    assert not blob.exists() and not unpacked.exists(), "the deleted function's code is still on disk"
    assert (code / "blobs" / "sha256" / f"{kept_digest}.tar.gz").exists()


def test_data_dir_and_databases_are_private(apusd):
    mode = stat.S_IMODE(os.stat(apusd.data_dir).st_mode)
    assert mode == 0o700, f"data dir is {oct(mode)}"
    for name in ("apus.db", "tasks.sqlite"):
        path = apusd.data_dir / name
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"
