"""gRPC helpers for the integration tests: the echo example's generated stubs (imported from
Examples/echo-python-grpc), channels to the gateway, `apus logs` polling and a count of this process's TCP
connections to a port.

Needs the pip packages grpcio, grpcio-health-checking and protobuf (Scripts/install-deps pins them).
"""

from __future__ import annotations

import os
import queue
import sys
from pathlib import Path

import grpc

from apus_testlib import EXAMPLES_DIR, wait_for_log  # noqa: F401 (re-exported for the gRPC tests)

ECHO_DIR = EXAMPLES_DIR / "echo-python-grpc"
ECHO_FUNCTION = "echo-python-grpc"
ECHO_SERVICE = "echo.Echo"

if str(ECHO_DIR) not in sys.path:
    sys.path.insert(0, str(ECHO_DIR))

# The generated modules are committed beside the example; import them without leaving a __pycache__ in the
# function's directory (it would be deployed with it).
_dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
try:
    import echo_pb2  # noqa: E402
    import echo_pb2_grpc  # noqa: E402
finally:
    sys.dont_write_bytecode = _dont_write_bytecode

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Every call gets a deadline so that a broken gateway fails a test instead of hanging it.
CALL_TIMEOUT = 30.0


def insecure_channel(apusd, extra_options: list | None = None) -> grpc.Channel:
    """h2c (prior knowledge) channel to the gateway's HTTP port."""
    return grpc.insecure_channel(f"127.0.0.1:{apusd.http_port}", options=CHANNEL_OPTIONS + list(extra_options or []))


def secure_channel(apusd, cert_path: Path) -> grpc.Channel:
    """TLS channel to the gateway's TLS port, trusting the self-signed cert (issued for localhost/127.0.0.1)."""
    creds = grpc.ssl_channel_credentials(root_certificates=Path(cert_path).read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{apusd.tls_port}", creds,
                               options=CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", "localhost")])


def echo_stub(channel: grpc.Channel) -> echo_pb2_grpc.EchoStub:
    return echo_pb2_grpc.EchoStub(channel)


def req(**fields) -> echo_pb2.EchoRequest:
    return echo_pb2.EchoRequest(**fields)


def metadata_dict(metadata) -> dict:
    """grpc metadata (sequence of (key, value)) as a dict; repeated keys keep the last value."""
    return {m[0]: m[1] for m in (metadata or ())}



def connections_to(port: int) -> int:
    """How many established TCP connections this process has to a local port (reads /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def queued_requests(outgoing: queue.Queue):
    """A request stream fed message by message: yields what the test puts on `outgoing` until it puts None."""
    while True:
        item = outgoing.get()
        if item is None:
            return
        yield item
