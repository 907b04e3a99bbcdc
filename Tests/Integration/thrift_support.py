"""Thrift helpers for the integration tests: the examples' generated code (imported from
Examples/calculator-python-thrift/gen and Examples/greeter-python-thrift/gen), clients for every transport
(framed, buffered, header) and protocol (binary, compact), optionally multiplexed, byte-level encoders and
decoders for pipelining and malformed-input tests (THeader and Kitex TTHeader frames included), and a runner for
the Python bootstrap in Thrift mode without the gateway.

Needs the pip package `thrift` (Scripts/install-deps pins it); instances run Debian's python3-thrift.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from thrift.protocol import TBinaryProtocol, TCompactProtocol, TMultiplexedProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport import TSocket, TTransport
from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID

from apus_testlib import EXAMPLES_DIR, REPO_ROOT, wait_for_log  # noqa: F401 (re-exported for the Thrift tests)

CALCULATOR_DIR = EXAMPLES_DIR / "calculator-python-thrift"
GREETER_DIR = EXAMPLES_DIR / "greeter-python-thrift"
CALCULATOR_FUNCTION = "calculator-python-thrift"
GREETER_FUNCTION = "greeter-python-thrift"
CALCULATOR_SERVICE = "Calculator"
GREETER_SERVICE = "Greeter"

BOOTSTRAP = REPO_ROOT / "Sources" / "ApusRuntime" / "Bootstrap" / "bootstrap.py"
# What instances run with (apusd's default interpreter): Debian's python3 with python3-thrift.
INSTANCE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

for _gen in (CALCULATOR_DIR / "gen", GREETER_DIR / "gen"):
    if str(_gen) not in sys.path:
        sys.path.insert(0, str(_gen))

# The generated packages are committed inside the function directories; import them without leaving a
# __pycache__ there (it would be deployed with the function).
_dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
try:
    from calculator import Calculator  # noqa: E402
    from calculator import ttypes as calc_types  # noqa: E402
    from greeter import Greeter  # noqa: E402
finally:
    sys.dont_write_bytecode = _dont_write_bytecode

TRANSPORTS = ("framed", "buffered", "header")
PROTOCOLS = ("binary", "compact")
COMBINATIONS = [(t, p) for t in TRANSPORTS for p in PROTOCOLS]
# Every call gets a socket timeout so that a broken peer fails a test instead of hanging it.
CALL_TIMEOUT = 30.0

HEADER_MAGIC = 0x0FFF  # THeader: bytes 4-5 of a frame
TTHEADER_MAGIC = 0x1000  # Kitex TTHeader
INFO_KEYVALUE = 0x01
INFO_INTKEYVALUE = 0x10  # TTHeader only
ZLIB_TRANSFORM = 0x01
# TTHeader integer keys (Kitex)
TT_TRANSPORT_TYPE, TT_LOG_ID, TT_FROM_SERVICE, TT_TO_SERVICE, TT_TO_METHOD, TT_RPC_TIMEOUT = 1, 2, 3, 6, 9, 12
PROTOCOL_IDS = {"binary": 0x00, "compact": 0x02}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_IDS.items()}


# --------------------------------------------------------------------------------------------------------------
# Clients built from the thrift library


def protocol_for(trans, protocol: str, strict: bool = True):
    """A binary (strict, or the old unversioned form when strict=False) or compact protocol over trans."""
    if protocol == "binary":
        return TBinaryProtocol.TBinaryProtocol(trans, strictRead=False, strictWrite=strict)
    if protocol == "compact":
        return TCompactProtocol.TCompactProtocol(trans)
    raise ValueError(f"unknown protocol {protocol!r}")


class ThriftClient:
    """A generated client (module: the generated service module, e.g. Calculator) over one TCP connection with the
    chosen transport and protocol.

    multiplexed="Calculator" wraps the protocol in TMultiplexedProtocol (method names go out as "Calculator:add").
    With transport="header", set_header() adds a THeader key for the next call and reply_headers() returns the
    headers of the last reply. Calls are the generated client's (client.add(1, 2)); attribute access delegates.
    """

    def __init__(self, host: str, port: int, module=Calculator, transport: str = "framed",
                 protocol: str = "binary", multiplexed: str | None = None, strict: bool = True,
                 timeout: float = CALL_TIMEOUT, zlib_transform: bool = False):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        self.transport_name, self.protocol_name = transport, protocol
        self.socket = TSocket.TSocket(host, port)
        self.socket.setTimeout(int(timeout * 1000))
        if transport == "header":
            subprotocol = THeaderSubprotocolID.COMPACT if protocol == "compact" else THeaderSubprotocolID.BINARY
            self.protocol = THeaderProtocol(self.socket, (THeaderClientType.HEADERS,), subprotocol)
            self.trans = self.protocol.trans
            if zlib_transform:
                self.protocol.add_transform(ZLIB_TRANSFORM)
        else:
            wrap = TTransport.TFramedTransport if transport == "framed" else TTransport.TBufferedTransport
            self.trans = wrap(self.socket)
            self.protocol = protocol_for(self.trans, protocol, strict)
        outer = self.protocol
        if multiplexed:
            outer = TMultiplexedProtocol.TMultiplexedProtocol(self.protocol, multiplexed)
        self.client = module.Client(outer)
        self.trans.open()

    def set_header(self, key: str, value: str):
        assert self.transport_name == "header", "headers need transport='header'"
        self.protocol.set_header(key.encode(), value.encode())

    def reply_headers(self) -> dict:
        assert self.transport_name == "header", "headers need transport='header'"
        return {k.decode(): v.decode("utf-8", "replace") for k, v in self.protocol.get_headers().items()}

    def __getattr__(self, name):
        return getattr(self.client, name)

    def close(self):
        try:
            self.trans.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def calculator_client(host, port, transport="framed", protocol="binary", multiplexed=None, **kw) -> ThriftClient:
    return ThriftClient(host, port, Calculator, transport, protocol, multiplexed, **kw)


def greeter_client(host, port, transport="framed", protocol="compact", multiplexed=None, **kw) -> ThriftClient:
    return ThriftClient(host, port, Greeter, transport, protocol, multiplexed, **kw)


# --------------------------------------------------------------------------------------------------------------
# Values


def all_types_value(seed: int = 1) -> "calc_types.AllTypes":
    """An AllTypes with every field set, containers nested, extreme integers and a non-UTF-8 blob."""
    P, S = calc_types.Point, calc_types.Shape
    return calc_types.AllTypes(
        flag=bool(seed % 2),
        tiny=-128 + seed % 3,
        small=-32768 + seed,
        medium=-(2 ** 31) + seed,
        large=2 ** 63 - seed,
        real=-1.25e-300 * seed,
        text="grüße, 世界 #%d" % seed,
        blob=bytes(range(256)) * 2,
        numbers=[0, -1, 2 ** 31 - 1, -(2 ** 31), seed],
        tags={"a", "b", "ü", ""},
        counts={"zero": 0, "min": -(2 ** 63), "max": 2 ** 63 - 1},
        shape=S(name="triangle", points=[P(0.0, 0.0), P(1.0, 0.0), P(0.5, 0.75)],
                anchors={"top": P(0.5, 0.75)}, center=P(0.5, 0.25)),
        shapes=[S(name="empty", points=[], anchors={}), S(name="dot", points=[P(-1.5, 2.5)], anchors={})],
        index={1: ["one", "uno"], -7: [], 2 ** 31 - 1: ["max"]},
        ids={-(2 ** 63), 0, 2 ** 63 - 1},
        matrix={"r1": {"c1": True, "c2": False}, "r2": {}},
        grid=[[1, 2, 3], [], [-32768, 32767]],
        note=None,
        op=calc_types.Operation.MULTIPLY,
    )


def expected_describe(flag, tiny, small, medium, large, real, text, blob) -> str:
    """What Calculator.describe returns (the example's format)."""
    return "flag=%s tiny=%s small=%s medium=%s large=%s real=%r text=%s blob=%s" % (
        flag, tiny, small, medium, large, real, text, blob.hex())


# --------------------------------------------------------------------------------------------------------------
# Bytes on the wire


def encode_message(name: str, args=None, seqid: int = 0, protocol: str = "binary",
                   message_type: int = TMessageType.CALL, strict: bool = True) -> bytes:
    """One message (envelope + argument struct) in the given protocol, without any framing. args is a generated
    `<method>_args` instance; None sends an empty struct."""
    buf = TTransport.TMemoryBuffer()
    prot = protocol_for(buf, protocol, strict)
    prot.writeMessageBegin(name, message_type, seqid)
    if args is None:
        prot.writeStructBegin("args")
        prot.writeFieldStop()
        prot.writeStructEnd()
    else:
        args.write(prot)
    prot.writeMessageEnd()
    return buf.getvalue()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def theader_frame(payload: bytes, seqid: int = 0, protocol: str = "binary", headers: dict | None = None,
                  zlib_transform: bool = False, flags: int = 0) -> bytes:
    """A THeader frame (doc/specs/HeaderFormat.md): LENGTH(4) 0x0FFF FLAGS(2) SEQID(4) HEADER-WORDS(2), then
    varint protocol id, varint transform count and ids, INFO_KEYVALUE (varint count, varint-length strings),
    zero padding to a multiple of 4, and the payload."""
    header = bytearray(_varint(PROTOCOL_IDS[protocol]))
    if zlib_transform:
        header += _varint(1) + _varint(ZLIB_TRANSFORM)
        payload = zlib.compress(payload)
    else:
        header += _varint(0)
    if headers:
        header += _varint(INFO_KEYVALUE) + _varint(len(headers))
        for key, value in headers.items():
            k, v = key.encode(), value.encode()
            header += _varint(len(k)) + k + _varint(len(v)) + v
    header += b"\x00" * (-len(header) % 4)
    body = struct.pack("!HHiH", HEADER_MAGIC, flags, seqid, len(header) // 4) + bytes(header) + payload
    return struct.pack("!I", len(body)) + body


def ttheader_frame(payload: bytes, seqid: int = 0, protocol: str = "binary", headers: dict | None = None,
                   int_headers: dict | None = None, flags: int = 0) -> bytes:
    """A Kitex TTHeader frame: LENGTH(4) 0x1000 FLAGS(2) SEQID(4) HEADER-WORDS(2), then protocol id (u8),
    transform count (u8, 0), INFO_INTKEYVALUE 0x10 (u16 count; u16 key, u16 length, value) and INFO_KEYVALUE 0x01
    (u16 count; u16 length + key, u16 length + value), zero padding to a multiple of 4, and the payload."""
    header = bytearray([PROTOCOL_IDS[protocol], 0])
    if int_headers:
        header += bytes([INFO_INTKEYVALUE]) + struct.pack("!H", len(int_headers))
        for key, value in int_headers.items():
            v = str(value).encode()
            header += struct.pack("!HH", key, len(v)) + v
    if headers:
        header += bytes([INFO_KEYVALUE]) + struct.pack("!H", len(headers))
        for key, value in headers.items():
            k, v = key.encode(), value.encode()
            header += struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v
    header += b"\x00" * (-len(header) % 4)
    body = struct.pack("!HHiH", TTHEADER_MAGIC, flags, seqid, len(header) // 4) + bytes(header) + payload
    return struct.pack("!I", len(body)) + body


def frame(payload: bytes, transport: str, seqid: int = 0, protocol: str = "binary", headers: dict | None = None,
          **kw) -> bytes:
    """Wrap one message for a transport: framed (4-byte length), buffered (as is), header (THeader) or ttheader."""
    if transport == "framed":
        return struct.pack("!I", len(payload)) + payload
    if transport == "buffered":
        return payload
    if transport == "header":
        return theader_frame(payload, seqid, protocol, headers, **kw)
    if transport == "ttheader":
        return ttheader_frame(payload, seqid, protocol, headers, **kw)
    raise ValueError(f"unknown transport {transport!r}")


def call_bytes(method: str, args=None, seqid: int = 0, transport: str = "framed", protocol: str = "binary",
               service: str | None = None, headers: dict | None = None, oneway: bool = False, **kw) -> bytes:
    """A whole call as sent on the wire; service="Calculator" names it "Calculator:<method>" (multiplexed)."""
    name = f"{service}:{method}" if service else method
    payload = encode_message(name, args, seqid, protocol, TMessageType.ONEWAY if oneway else TMessageType.CALL)
    return frame(payload, transport, seqid, protocol, headers, **kw)


@dataclass
class HeaderFrame:
    """A parsed THeader or TTHeader frame."""
    magic: int
    flags: int
    seqid: int
    protocol_id: int
    transforms: list
    headers: dict = field(default_factory=dict)
    int_headers: dict = field(default_factory=dict)
    payload: bytes = b""


def _read_varint(data: bytes, pos: int):
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def parse_header_frame(body: bytes) -> HeaderFrame:
    """Parse a THeader/TTHeader frame body (everything after the 4-byte LENGTH)."""
    magic, flags, seqid, words = struct.unpack_from("!HHiH", body, 0)
    end = 10 + words * 4
    assert end <= len(body), f"header of {words * 4} bytes is longer than the frame ({len(body)} bytes)"
    h = HeaderFrame(magic, flags, seqid, 0, [])
    pos = 10
    if magic == HEADER_MAGIC:
        h.protocol_id, pos = _read_varint(body, pos)
        count, pos = _read_varint(body, pos)
        for _ in range(count):
            tid, pos = _read_varint(body, pos)
            h.transforms.append(tid)
        while pos < end:
            info, pos = _read_varint(body, pos)
            if info != INFO_KEYVALUE:
                break  # padding (0) or an info type we do not know: skip to the payload
            count, pos = _read_varint(body, pos)
            for _ in range(count):
                n, pos = _read_varint(body, pos)
                key = body[pos:pos + n].decode("utf-8", "replace")
                pos += n
                n, pos = _read_varint(body, pos)
                h.headers[key] = body[pos:pos + n].decode("utf-8", "replace")
                pos += n
    elif magic == TTHEADER_MAGIC:
        h.protocol_id, count = body[pos], body[pos + 1]
        pos += 2
        h.transforms = list(body[pos:pos + count])
        pos += count
        while pos < end:
            info = body[pos]
            pos += 1
            if info == INFO_INTKEYVALUE:
                (count,) = struct.unpack_from("!H", body, pos)
                pos += 2
                for _ in range(count):
                    key, n = struct.unpack_from("!HH", body, pos)
                    pos += 4
                    h.int_headers[key] = body[pos:pos + n].decode("utf-8", "replace")
                    pos += n
            elif info == INFO_KEYVALUE:
                (count,) = struct.unpack_from("!H", body, pos)
                pos += 2
                for _ in range(count):
                    (n,) = struct.unpack_from("!H", body, pos)
                    key = body[pos + 2:pos + 2 + n].decode("utf-8", "replace")
                    pos += 2 + n
                    (n,) = struct.unpack_from("!H", body, pos)
                    h.headers[key] = body[pos + 2:pos + 2 + n].decode("utf-8", "replace")
                    pos += 2 + n
            else:
                break  # padding or an unknown info block
    else:
        raise AssertionError(f"not a THeader/TTHeader frame: magic 0x{magic:04x}")
    payload = body[end:]
    for tid in reversed(h.transforms):
        assert tid == ZLIB_TRANSFORM, f"unknown transform {tid}"
        payload = zlib.decompress(payload)
    h.payload = payload
    return h


@dataclass
class Reply:
    """One decoded reply message."""
    name: str
    type: int
    seqid: int
    value: object  # the generated `<method>_result`, or a TApplicationException when type is EXCEPTION
    header: HeaderFrame | None = None
    raw: bytes = b""  # the bytes read for it (framed/header: the whole frame with its length)

    @property
    def is_exception(self) -> bool:
        return self.type == TMessageType.EXCEPTION

    @property
    def success(self):
        assert not self.is_exception, f"expected a reply, got TApplicationException {self.value!r}"
        return self.value.success


def decode_message(prot, module=Calculator) -> tuple:
    """(name, type, seqid, value) of one reply read from prot; value as in Reply."""
    name, mtype, seqid = prot.readMessageBegin()
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if mtype == TMessageType.EXCEPTION:
        value = TApplicationException()
        value.read(prot)
    else:
        result_cls = getattr(module, name.rpartition(":")[2] + "_result", None)
        if result_cls is None:
            prot.skip(TType.STRUCT)
            value = None
        else:
            value = result_cls()
            value.read(prot)
    prot.readMessageEnd()
    return name, mtype, seqid, value


class _SocketReader(TTransport.TTransportBase):
    """A blocking socket as a thrift transport (reads only)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def isOpen(self):
        return True

    def read(self, sz):
        data = self.sock.recv(max(1, min(sz, 1 << 20)))
        if not data:
            raise TTransport.TTransportException(TTransport.TTransportException.END_OF_FILE, "peer closed")
        return data


class RawConnection:
    """A plain TCP connection for byte-level tests: send any bytes, read replies in a given transport/protocol
    (header replies: THeader or TTHeader, whichever comes), and tell whether the peer closed the connection."""

    def __init__(self, host: str, port: int, transport: str = "framed", protocol: str = "binary",
                 timeout: float = CALL_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport, self.protocol = transport, protocol
        self._buffered = TTransport.TBufferedTransport(_SocketReader(self.sock))

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        parts, have = [], 0
        while have < n:
            chunk = self.sock.recv(min(n - have, 1 << 20))
            if not chunk:
                raise ConnectionError(f"peer closed the connection after {have} of {n} bytes")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def read_reply(self, module=Calculator) -> Reply:
        """The next reply; module is the generated service module whose `<method>_result` decodes it."""
        if self.transport == "buffered":
            prot = protocol_for(self._buffered, self.protocol)
            name, mtype, seqid, value = decode_message(prot, module)
            return Reply(name, mtype, seqid, value)
        prefix = self.recv_exact(4)
        (length,) = struct.unpack("!I", prefix)
        assert length <= 256 << 20, f"reply frame length {length} is absurd"
        body = self.recv_exact(length)
        header = None
        payload, protocol = body, self.protocol
        if self.transport in ("header", "ttheader"):
            header = parse_header_frame(body)
            payload, protocol = header.payload, PROTOCOL_NAMES.get(header.protocol_id, self.protocol)
        prot = protocol_for(TTransport.TMemoryBuffer(payload), protocol)
        name, mtype, seqid, value = decode_message(prot, module)
        return Reply(name, mtype, seqid, value, header, prefix + body)

    def call(self, method: str, args=None, seqid: int = 1, module=Calculator, **kw) -> Reply:
        """Send one call (keywords as for call_bytes, e.g. service="Calculator", headers={...}) and read a reply."""
        self.send(call_bytes(method, args, seqid, self.transport, self.protocol, **kw))
        return self.read_reply(module)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the peer has closed (EOF or reset) within timeout; bytes it sends meanwhile are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def random_garbage(n: int = 64, seed: int = 7) -> bytes:
    """Bytes no transport accepts: the first word is negative as a frame length and no protocol's version."""
    rng = random.Random(seed)
    return b"\xde\xad\xbe\xef" + bytes(rng.randrange(256) for _ in range(n - 4))


# --------------------------------------------------------------------------------------------------------------
# Logs and ports



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# The Python bootstrap in Thrift mode, run directly (no apusd)


class BootstrapInstance:
    """Runs Sources/ApusRuntime/Bootstrap/bootstrap.py with APUS_PROTOCOL=thrift in a function directory, as the
    platform does (same environment variables), with stdout/stderr captured to files."""

    def __init__(self, func_dir: Path, workdir: Path, transport: str = "framed", protocol: str = "binary",
                 service: str = CALCULATOR_SERVICE, handler: str = "service.processor", function: str = "calc",
                 instance: str | None = None, concurrency: int = 8, extra_env: dict | None = None,
                 python: str = INSTANCE_PYTHON):
        self.func_dir, self.workdir = Path(func_dir), Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.function = function
        self.instance = instance or f"i-{transport[:2]}{protocol[:2]}{self.port}"
        self.transport, self.protocol = transport, protocol
        self.stdout_path = self.workdir / f"{self.instance}.stdout"
        self.stderr_path = self.workdir / f"{self.instance}.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("APUS_")}
        env.update({
            "APUS_PORT": str(self.port), "APUS_FUNCTION": function, "APUS_VERSION": "1",
            "APUS_INSTANCE": self.instance, "APUS_CONCURRENCY": str(concurrency), "APUS_PROTOCOL": "thrift",
            "APUS_HANDLER": handler, "APUS_THRIFT_SERVICE": service, "APUS_THRIFT_TRANSPORT": transport,
            "APUS_THRIFT_PROTOCOL": protocol, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(extra_env or {})
        self.env = env
        self.python = python
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 15.0):
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([self.python, str(BOOTSTRAP)], cwd=self.func_dir, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0):
        """Readiness as the platform probes it: the port accepts a TCP connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bootstrap exited with {self.proc.returncode} before it was ready:\n"
                                     f"{self.stderr()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"bootstrap never listened on {self.port} within {timeout:.0f}s:\n{self.stderr()}")

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"bootstrap did not exit within {timeout:.0f}s:\n{self.stderr()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait_exit(timeout)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_stdout(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.stdout()
            if needle in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never showed up on the instance's stdout:\n{self.stdout()[-2000:]}\n"
                             f"stderr:\n{self.stderr()[-2000:]}")

    def client(self, module=Calculator, multiplexed=None, transport=None, protocol=None, **kw) -> ThriftClient:
        return ThriftClient("127.0.0.1", self.port, module, transport or self.transport,
                            protocol or self.protocol, multiplexed, **kw)

    def raw(self, transport=None, protocol=None, **kw) -> RawConnection:
        return RawConnection("127.0.0.1", self.port, transport or self.transport, protocol or self.protocol, **kw)
