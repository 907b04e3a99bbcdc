"""A raw HTTP/2 client on one connection (the pip package h2): for tests that mix gRPC calls, HTTP requests and
health checks on one connection, reset one stream in the middle, or hold flow control back by hand.

Needs the pip package h2 (Scripts/install-deps pins it).
"""

from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_messages(body: bytes) -> list[bytes]:
    """The messages of a gRPC response body."""
    messages = []
    while len(body) >= 5:
        _, length = struct.unpack(">BI", body[:5])
        messages.append(body[5:5 + length])
        body = body[5 + length:]
    assert not body, f"{len(body)} stray bytes after the last message"
    return messages


class Stream:
    def __init__(self):
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False
        self.reset: int | None = None

    @property
    def grpc_status(self) -> str | None:
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))


class H2Client:
    """One h2c (prior knowledge) connection. `auto_ack`: give flow-control window back as DATA arrives."""

    def __init__(self, port: int, auto_ack: bool = True, initial_window: int = 65_535,
                 connection_window: int = 65_535, timeout: float = 30.0):
        self.port, self.auto_ack, self.timeout = port, auto_ack, timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.conn.initiate_connection()
        if connection_window > 65_535:
            self.conn.increment_flow_control_window(connection_window - 65_535)
        self.streams: dict[int, Stream] = {}
        self.unacknowledged: dict[int, int] = {}
        self.goaway = None
        self._send()

    def close(self):
        self.sock.close()

    def _send(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, headers: list[tuple[str, str]], body: bytes | None = None, end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=body is None and end)
        self.streams[stream_id] = Stream()
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        self._send()
        return stream_id

    def grpc_call(self, path: str, message: bytes, metadata: list[tuple[str, str]] | None = None) -> int:
        return self.request([(":method", "POST"), (":scheme", "http"), (":path", path),
                             (":authority", f"127.0.0.1:{self.port}"), ("content-type", "application/grpc"),
                             ("te", "trailers"), *(metadata or [])], grpc_frame(message))

    def get(self, path: str) -> int:
        return self.request([(":method", "GET"), (":scheme", "http"), (":path", path),
                             (":authority", f"127.0.0.1:{self.port}")])

    def reset(self, stream_id: int, code: int = 8):
        """RST_STREAM (8: CANCEL)."""
        self.conn.reset_stream(stream_id, error_code=code)
        self._send()

    def acknowledge(self, stream_id: int | None = None):
        """Gives back the window for what arrived so far (one stream, or all)."""
        for sid in [stream_id] if stream_id is not None else list(self.unacknowledged):
            count = self.unacknowledged.pop(sid, 0)
            if count:
                try:
                    self.conn.acknowledge_received_data(count, sid)
                except h2.exceptions.StreamClosedError:
                    pass
        self._send()

    def pump(self, seconds: float):
        """Reads whatever arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read(max(0.01, deadline - time.monotonic()))

    def wait(self, *stream_ids: int):
        """Reads until the streams have ended (or were reset)."""
        deadline = time.monotonic() + self.timeout
        while not all(self.streams[s].ended for s in stream_ids):
            assert time.monotonic() < deadline, f"streams {stream_ids} did not end within {self.timeout}s"
            self._read(deadline - time.monotonic())

    def _read(self, timeout: float):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return
        if not data:
            raise ConnectionError("the gateway closed the connection")
        for event in self.conn.receive_data(data):
            stream = self.streams.get(getattr(event, "stream_id", 0))
            if isinstance(event, h2.events.ResponseReceived):
                stream.headers = dict(event.headers)
            elif isinstance(event, h2.events.TrailersReceived):
                stream.trailers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                stream.body += event.data
                if self.auto_ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    self.unacknowledged[event.stream_id] = (
                        self.unacknowledged.get(event.stream_id, 0) + event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                stream.ended = True
            elif isinstance(event, h2.events.StreamReset):
                if stream is not None:
                    stream.reset, stream.ended = event.error_code, True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self._send()
