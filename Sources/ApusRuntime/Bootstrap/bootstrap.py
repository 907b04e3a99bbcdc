"""Apus Python runtime bootstrap.

Started by the Apus node agent as ``python3 bootstrap.py`` with the working
directory set to the function's code directory. It imports the user's handler
(``APUS_HANDLER``, ``module.function``), then serves HTTP/1.1 with keep-alive on
``127.0.0.1:$APUS_PORT`` and turns every request into a
``handler(event, context)`` call.

With ``APUS_PROTOCOL=grpc`` it serves gRPC instead: ``APUS_HANDLER`` names a
``register(server)`` function that adds the user's generated servicers to a
``grpc.server``, which listens on the same address (see ``_serve_grpc``).

With ``APUS_PROTOCOL=thrift`` it serves Thrift: ``APUS_HANDLER`` names a
function without arguments that returns a Thrift processor (for example
``Calculator.Processor(Handler())``), served with the transport and protocol
of ``APUS_THRIFT_TRANSPORT`` / ``APUS_THRIFT_PROTOCOL`` (see ``_serve_thrift``).

HTTP mode uses the standard library only; runs on Python 3.8+ (tested with
Debian's 3.11). gRPC mode needs grpcio and protobuf (Debian: python3-grpcio,
python3-protobuf); Thrift mode needs thrift (Debian: python3-thrift).
See docs/runtime-contract.md for the contract this file implements.
"""

import os
import sys

# Instances run under RLIMIT_AS (address-space limit from the manifest's `memory`).
# glibc reserves 64 MiB of address space per malloc arena and creates up to 8 per
# core as threads appear, which exhausts a 256Mi limit after a few dozen threads.
# MALLOC_ARENA_MAX is only read at process start, so re-exec once with it set.
if "MALLOC_ARENA_MAX" not in os.environ and __name__ == "__main__":
    os.environ["MALLOC_ARENA_MAX"] = "2"
    try:
        os.execv(sys.executable, getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    except (OSError, ValueError):
        pass  # keep going with the default arenas

import threading

# Keep per-thread stack reservations small for the same reason.
# This must happen before any thread is started.
threading.stack_size(512 * 1024)

import base64
import binascii
import http.server
import json
import signal
import socket
import socketserver
import time
import traceback
import uuid
from urllib.parse import parse_qsl, urlsplit

# --------------------------------------------------------------------------
# Logging: the platform captures stdout/stderr line by line.
# --------------------------------------------------------------------------

for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.reconfigure(line_buffering=True, errors="backslashreplace")
    except (AttributeError, ValueError):
        pass
# Child processes started by the function should not block-buffer either.
os.environ.setdefault("PYTHONUNBUFFERED", "1")

_log_lock = threading.Lock()


def _log_err(text):
    """Write one or more lines to stderr without interleaving with other threads."""
    if not text.endswith("\n"):
        text += "\n"
    with _log_lock:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _format_user_exception(exc):
    """Format ``exc`` without the leading frames that belong to this file or to importlib."""
    tb = exc.__traceback__
    here = os.path.abspath(__file__)
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename == here or filename.startswith("<frozen importlib") or (
            os.path.basename(filename) == "__init__.py" and os.path.basename(os.path.dirname(filename)) == "importlib"
        ):
            tb = tb.tb_next
        else:
            break
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _fatal(message, code=1):
    _log_err("apus-bootstrap: " + message)
    sys.exit(code)


# --------------------------------------------------------------------------
# Configuration from the environment.
# --------------------------------------------------------------------------

DEFAULT_HANDLERS = {"grpc": "main.register", "thrift": "main.processor"}
HOST = "127.0.0.1"


def _read_instance_configuration():
    """(Re)reads the instance's identity from the environment: at start, or once a prewarmed process is given
    its function (see _wait_for_function)."""
    global FUNCTION_NAME, FUNCTION_VERSION, INSTANCE_ID, PROTOCOL, HANDLER_SPEC
    FUNCTION_NAME = os.environ.get("APUS_FUNCTION", "")
    FUNCTION_VERSION = os.environ.get("APUS_VERSION", "")
    INSTANCE_ID = os.environ.get("APUS_INSTANCE", "")
    PROTOCOL = (os.environ.get("APUS_PROTOCOL", "") or "http").strip().lower()
    HANDLER_SPEC = os.environ.get("APUS_HANDLER", "") or DEFAULT_HANDLERS.get(PROTOCOL, "main.handler")


_read_instance_configuration()

# gRPC mode: largest message accepted or sent (APUS_GRPC_MAX_MESSAGE_BYTES overrides), worker threads
# beyond APUS_CONCURRENCY, and how long in-flight calls get to finish after SIGTERM (below apusd's
# default --stop-grace of 5 s, so the instance exits by itself before it is killed).
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_DEFAULT_CONCURRENCY = 10
GRPC_SPARE_WORKERS = 2
GRPC_STOP_GRACE_SECONDS = 4.5

# Thrift mode: the transports and protocols served (APUS_THRIFT_TRANSPORT / APUS_THRIFT_PROTOCOL, first one is
# the default) and how long calls in flight get to finish after SIGTERM (as for gRPC).
THRIFT_TRANSPORTS = ("framed", "buffered", "header")
THRIFT_PROTOCOLS = ("binary", "compact")
THRIFT_STOP_GRACE_SECONDS = 4.5

# Returned by get_remaining_time_in_millis() when the request carries no deadline.
NO_DEADLINE_REMAINING_MS = 2_147_483_647


def _port_from_env():
    raw = os.environ.get("APUS_PORT", "")
    try:
        port = int(raw)
    except ValueError:
        _fatal("APUS_PORT must be set to a TCP port number (got %r)" % raw, 2)
    if not 0 < port < 65536:
        _fatal("APUS_PORT out of range: %d" % port, 2)
    return port


def _int_from_env(name, default, minimum=1):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        _fatal("%s must be an integer (got %r)" % (name, raw), 2)
    if value < minimum:
        _fatal("%s must be at least %d (got %d)" % (name, minimum, value), 2)
    return value


def _put_code_dir_first():
    """Make the code directory (the working directory) the first entry of sys.path; returns it."""
    code_dir = os.getcwd()
    if sys.path and sys.path[0] == code_dir:
        return code_dir
    # Python put this file's directory at sys.path[0]; the function's code comes first instead.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and here != code_dir and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]
    sys.path.insert(0, code_dir)
    # The code directory is the deployed artifact (read-only in the sandbox): never write __pycache__ into it.
    sys.dont_write_bytecode = True
    return code_dir


def _load_handler(spec, kind="handler"):
    """Import ``module.function`` from the code directory; exit non-zero on failure.

    ``kind`` names the function in error messages ("handler", or "gRPC register" in gRPC mode)."""
    module_name, sep, func_name = spec.rpartition(".")
    if not sep or not module_name or not func_name:
        _fatal("APUS_HANDLER must look like 'module.function' (got %r)" % spec, 2)

    code_dir = _put_code_dir_first()

    import importlib

    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # SyntaxError, ImportError, anything raised at import time, sys.exit()
        details = _format_user_exception(exc)
        _log_err(
            "apus-bootstrap: cannot import %s module %r (APUS_HANDLER=%r) from %s: %s: %s\n%s"
            % (kind, module_name, spec, code_dir, type(exc).__name__, exc, details)
        )
        sys.exit(1)

    func = getattr(module, func_name, None)
    if func is None:
        _fatal(
            "%s function %r not found in module %r (APUS_HANDLER=%r, file %s)"
            % (kind, func_name, module_name, spec, getattr(module, "__file__", "?"))
        )
    if not callable(func):
        _fatal("APUS_HANDLER=%r refers to a %s, not a function" % (spec, type(func).__name__))
    return func


# --------------------------------------------------------------------------
# Invocation context.
# --------------------------------------------------------------------------


class Context:
    """Second argument of ``handler(event, context)``."""

    __slots__ = ("function_name", "function_version", "instance_id", "request_id", "deadline_ms",
                 "task_id", "attempt", "progress_url")

    def __init__(self, request_id, deadline_ms, task_id=None, attempt=None, progress_url=None):
        self.function_name = FUNCTION_NAME
        self.function_version = FUNCTION_VERSION
        self.instance_id = INSTANCE_ID
        self.request_id = request_id
        # Unix epoch milliseconds, or None when the request carries no deadline.
        self.deadline_ms = deadline_ms
        # Set when the call is an asynchronous task (X-Apus-Task-Id, X-Apus-Attempt, X-Apus-Progress-Url).
        self.task_id = task_id
        self.attempt = attempt
        self.progress_url = progress_url

    def report_progress(self, progress=None, message=None):
        """Post progress (also a heartbeat) for the task this call runs. Returns False once the task has been
        cancelled (the handler should stop), True otherwise; a no-op returning True outside tasks."""
        return report_progress(self.progress_url, progress, message)

    def get_remaining_time_in_millis(self):
        if self.deadline_ms is None:
            return NO_DEADLINE_REMAINING_MS
        return max(0, int(self.deadline_ms - time.time() * 1000))

    def __repr__(self):
        return "Context(function_name=%r, function_version=%r, instance_id=%r, request_id=%r)" % (
            self.function_name,
            self.function_version,
            self.instance_id,
            self.request_id,
        )


def report_progress(progress_url, progress=None, message=None, timeout=5.0):
    """POST {progress, message} to a task's progress URL (X-Apus-Progress-Url / gRPC metadata apus-progress-url).
    Returns False when the platform answers that the task was cancelled; True otherwise (also when the report
    could not be delivered: a missed heartbeat is judged by the platform, not here)."""
    if not progress_url:
        return True
    import urllib.request

    body = {}
    if progress is not None:
        body["progress"] = float(progress)
    if message is not None:
        body["message"] = str(message)
    request = urllib.request.Request(progress_url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return not json.loads(response.read() or b"{}").get("cancelled", False)
    except urllib.error.HTTPError as exc:
        return exc.code != 409  # 409: the task is no longer running (cancelled, timed out)
    except (OSError, ValueError):
        return True


# Function code may `import apus` for the runtime helpers, e.g. apus.report_progress(url, progress, message) in a
# gRPC servicer (the URL is the call's `apus-progress-url` metadata).
sys.modules.setdefault("apus", sys.modules[__name__])


# --------------------------------------------------------------------------
# Mapping handler results to HTTP responses.
# --------------------------------------------------------------------------


class InvalidResponse(Exception):
    """The handler returned something that cannot be turned into an HTTP response."""


def _json_bytes(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _has_header(headers, name):
    name = name.lower()
    return any(k.lower() == name for k, _ in headers)


# Framing headers are always computed by the bootstrap.
_RESERVED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def _check_header_token(text, what):
    if "\r" in text or "\n" in text or "\0" in text:
        raise InvalidResponse("response %s contains a control character: %r" % (what, text))


def _response_from_dict(result):
    status = result.get("statusCode")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise InvalidResponse("statusCode must be an integer between 100 and 599, got %r" % (status,))

    headers = []
    raw_headers = result.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise InvalidResponse("headers must be a dict, got %s" % type(raw_headers).__name__)
    for name, value in raw_headers.items():
        name = str(name)
        _check_header_token(name, "header name")
        if not name or name.lower() in _RESERVED_HEADERS:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            v = "" if v is None else str(v)
            _check_header_token(v, "header value")
            headers.append((name, v))

    body = result.get("body")
    is_b64 = bool(result.get("isBase64Encoded", False))
    default_type = None
    if body is None:
        payload = b""
    elif is_b64:
        if isinstance(body, (bytes, bytearray)):
            body = bytes(body).decode("ascii", "replace")
        if not isinstance(body, str):
            raise InvalidResponse("isBase64Encoded is true but body is %s" % type(body).__name__)
        try:
            payload = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidResponse("body is not valid base64: %s" % exc)
        default_type = "application/octet-stream"
    elif isinstance(body, str):
        payload = body.encode("utf-8")
        default_type = "text/plain; charset=utf-8"
    elif isinstance(body, (bytes, bytearray, memoryview)):
        payload = bytes(body)
        default_type = "application/octet-stream"
    else:
        payload = _json_bytes(body)
        default_type = "application/json"

    if default_type and payload and not _has_header(headers, "content-type"):
        headers.append(("Content-Type", default_type))
    return status, headers, payload


def _to_response(result):
    """Return (status, [(name, value)], body bytes) for a handler's return value."""
    if result is None:
        return 204, [], b""
    if isinstance(result, str):
        return 200, [("Content-Type", "text/plain; charset=utf-8")], result.encode("utf-8")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return 200, [("Content-Type", "application/octet-stream")], bytes(result)
    if isinstance(result, dict) and "statusCode" in result:
        return _response_from_dict(result)
    # dict, list, numbers, booleans... -> JSON (TypeError if not serializable).
    return 200, [("Content-Type", "application/json")], _json_bytes(result)


def _error_body(code, message):
    return _json_bytes({"error": {"code": code, "message": message}})


# --------------------------------------------------------------------------
# In-flight tracking for graceful shutdown.
# --------------------------------------------------------------------------


class _Drain:
    def __init__(self):
        self._cond = threading.Condition()
        self._in_flight = 0
        self.draining = False

    def enter(self):
        with self._cond:
            self._in_flight += 1

    def leave(self):
        with self._cond:
            self._in_flight -= 1
            if self._in_flight <= 0:
                self._cond.notify_all()

    def wait_idle(self, timeout=None):
        """Wait until nothing is in flight (at most ``timeout`` seconds if given); True when idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._in_flight > 0:
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            return True


DRAIN = _Drain()


# --------------------------------------------------------------------------
# HTTP server.
# --------------------------------------------------------------------------


class _ClientGone(Exception):
    """The peer closed the connection while we were reading the request."""


class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "apus-python"
    sys_version = ""
    # Responses are written in one piece; no Nagle delay on keep-alive connections.
    disable_nagle_algorithm = True

    handler_func = None  # set in main()

    # No access log: stdout/stderr belong to the user's function.
    def log_message(self, format, *args):
        pass

    # ---- low-level response writing -------------------------------------

    def _write_response(self, status, headers, body, close=False):
        if close or DRAIN.draining:
            self.close_connection = True
        reason = self.responses.get(status, ("",))[0]
        lines = ["%s %d %s" % (self.protocol_version, status, reason)]
        lines.append("Date: " + self.date_time_string())
        lines.append("Server: " + self.server_version)
        for name, value in headers:
            lines.append("%s: %s" % (name, value))
        bodyless_status = status < 200 or status in (204, 304)
        if not bodyless_status:
            # RFC 9110 forbids Content-Length on 1xx/204; 304 has no body either.
            lines.append("Content-Length: %d" % len(body))
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        if self.command == "HEAD" or bodyless_status:
            body = b""
        self.wfile.write(head + body)

    def send_error(self, code, message=None, explain=None):
        # Used by BaseHTTPRequestHandler for malformed requests / unknown methods.
        code = int(code)
        if code == 501 or code == 405:
            err = "method_not_allowed"
        elif 400 <= code < 500:
            err = "bad_request"
        else:
            err = "internal"
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        body = _error_body(err, message)
        try:
            self._write_response(
                code, [("Content-Type", "application/json")], body, close=True
            )
        except OSError:
            self.close_connection = True

    # ---- request reading ---------------------------------------------------

    def _read_exact(self, n):
        data = self.rfile.read(n)
        if len(data) != n:
            raise _ClientGone()
        return data

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if te:
            if te.replace(" ", "").split(",")[-1] != "chunked":
                raise ValueError("unsupported Transfer-Encoding: %s" % te)
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length.strip())
        except ValueError:
            raise ValueError("invalid Content-Length: %r" % length)
        if n < 0:
            raise ValueError("invalid Content-Length: %r" % length)
        return self._read_exact(n) if n else b""

    def _read_chunked(self):
        parts = []
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise _ClientGone()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ValueError("invalid chunk size: %r" % size_text)
            if size < 0:
                raise ValueError("invalid chunk size: %r" % size_text)
            if size == 0:
                # Trailer section, terminated by an empty line.
                while True:
                    trailer = self.rfile.readline(65537)
                    if not trailer:
                        raise _ClientGone()
                    if trailer in (b"\r\n", b"\n"):
                        return b"".join(parts)
            parts.append(self._read_exact(size))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ValueError("malformed chunk terminator")

    # ---- dispatch ----------------------------------------------------------

    def _dispatch(self):
        DRAIN.enter()
        try:
            self._handle_request()
        finally:
            DRAIN.leave()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    def _handle_request(self):
        target = self.path
        if "://" in target.split("?", 1)[0]:
            # absolute-form request target
            parts = urlsplit(target)
            path, raw_query = parts.path or "/", parts.query
        else:
            path, _, raw_query = target.partition("?")
            path = path.split("#", 1)[0]
            raw_query = raw_query.split("#", 1)[0]
        path = path or "/"

        try:
            body = self._read_body()
        except _ClientGone:
            self.close_connection = True
            return
        except ValueError as exc:
            self.send_error(400, str(exc))
            return

        if (
            self.command == "GET"
            and path == "/healthz"
            and (self.headers.get("X-Apus-Probe") or "").strip() == "1"
        ):
            self._write_response(200, [("Content-Type", "text/plain; charset=utf-8")], b"ok\n")
            return

        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = value if key not in headers else headers[key] + ", " + value

        query = {}
        for key, value in parse_qsl(raw_query, keep_blank_values=True):
            query[key] = value  # last value wins

        try:
            body_text = body.decode("utf-8")
            is_b64 = False
        except UnicodeDecodeError:
            body_text = base64.b64encode(body).decode("ascii")
            is_b64 = True

        event = {
            "method": self.command,
            "path": path,
            "query": query,
            "rawQuery": raw_query,
            "headers": headers,
            "body": body_text,
            "isBase64Encoded": is_b64,
        }

        request_id = (self.headers.get("X-Apus-Request-Id") or "").strip() or uuid.uuid4().hex
        deadline_ms = None
        raw_deadline = self.headers.get("X-Apus-Deadline-Ms")
        if raw_deadline:
            try:
                deadline_ms = float(raw_deadline.strip())
            except ValueError:
                deadline_ms = None
        attempt = (self.headers.get("X-Apus-Attempt") or "").strip()
        context = Context(request_id, deadline_ms, task_id=(self.headers.get("X-Apus-Task-Id") or "").strip() or None,
                          attempt=int(attempt) if attempt.isdigit() else None,
                          progress_url=(self.headers.get("X-Apus-Progress-Url") or "").strip() or None)

        try:
            result = type(self).handler_func(event, context)
            if hasattr(result, "__await__"):
                import asyncio

                result = asyncio.run(_await(result))
            status, resp_headers, payload = _to_response(result)
        except BaseException as exc:  # includes sys.exit() inside the handler
            if isinstance(exc, KeyboardInterrupt):
                raise
            message = "%s: %s" % (type(exc).__name__, exc)
            tb = _format_user_exception(exc).rstrip("\n").split("\n")
            _log_err(
                "apus: request %s: handler raised %s\n" % (request_id, message)
                + "\n".join("[%s] %s" % (request_id, line) for line in tb)
            )
            status, resp_headers, payload = (
                500,
                [("Content-Type", "application/json")],
                _error_body("function_error", message),
            )

        self._write_response(status, resp_headers, payload)


async def _await(awaitable):
    return await awaitable


class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN (a name lookup costing about a millisecond of every start);
        # the instance only ever listens on loopback.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return
        if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "thread" in str(exc)):
            _log_err(
                "apus-bootstrap: dropped a connection: cannot start a thread for it (%s: %s); "
                "the instance is at its memory limit" % (type(exc).__name__, exc)
            )
            return
        _log_err("apus-bootstrap: connection error: " + traceback.format_exc())


# --------------------------------------------------------------------------
# gRPC server (APUS_PROTOCOL=grpc).
# --------------------------------------------------------------------------


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _serve_grpc(port):
    """Serve the user's gRPC services on 127.0.0.1:port until SIGTERM/SIGINT; never returns.

    ``APUS_HANDLER`` names ``register(server)``, which adds the generated servicers to the server, e.g.
    ``echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)``. Readiness is probed by the platform with an
    HTTP/2 connection preface, so nothing is served here besides the user's services.
    """
    # A grpcio vendored in the code directory wins over the interpreter's.
    _put_code_dir_first()
    try:
        import grpc
        from concurrent import futures
    except ImportError as exc:
        _fatal(
            "APUS_PROTOCOL=grpc needs the grpcio package for %s (Debian: python3-grpcio python3-protobuf): %s"
            % (sys.executable, exc)
        )

    register = _load_handler(HANDLER_SPEC, "gRPC register")
    concurrency = _int_from_env("APUS_CONCURRENCY", GRPC_DEFAULT_CONCURRENCY)
    max_message = _int_from_env("APUS_GRPC_MAX_MESSAGE_BYTES", GRPC_DEFAULT_MAX_MESSAGE_BYTES)

    # One worker thread per call in flight (streaming calls hold theirs until they end), plus a little slack.
    executor = futures.ThreadPoolExecutor(
        max_workers=concurrency + GRPC_SPARE_WORKERS, thread_name_prefix="apus-grpc"
    )
    options = [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        # grpc sets SO_REUSEPORT by default; a port somebody else holds must fail the bind instead.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(executor, options=options)

    try:
        register(server)
    except BaseException as exc:  # anything the user's register() raises, sys.exit() included
        if isinstance(exc, KeyboardInterrupt):
            raise
        _log_err(
            "apus-bootstrap: %s(server) raised %s: %s (APUS_HANDLER=%r)\n%s"
            % (HANDLER_SPEC, type(exc).__name__, exc, HANDLER_SPEC, _format_user_exception(exc))
        )
        sys.exit(1)

    address = "%s:%d" % (HOST, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # newer grpcio raises instead of returning 0
        _fatal("cannot listen on %s: %s" % (address, exc))
    if bound != port:
        _fatal("cannot listen on %s (grpc bound port %r)" % (address, bound))

    stop_requested = threading.Event()

    def on_signal(signum, frame):
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server.start()
    while not stop_requested.wait(0.5):
        pass

    # New calls are refused from here on; calls in flight get the grace period, then are cancelled.
    server.stop(GRPC_STOP_GRACE_SECONDS).wait(GRPC_STOP_GRACE_SECONDS + 1)
    _flush_std_streams()
    os._exit(0)


# --------------------------------------------------------------------------
# Thrift server (APUS_PROTOCOL=thrift).
# --------------------------------------------------------------------------


def _thrift_choice(name, allowed):
    """The value of ``name`` from the environment, one of ``allowed`` (default: the first); exits otherwise."""
    raw = (os.environ.get(name, "") or allowed[0]).strip().lower()
    if raw not in allowed:
        _fatal("%s must be one of %s (got %r)" % (name, ", ".join(allowed), raw), 2)
    return raw


class _ThriftConnection:
    """One accepted Thrift connection and whether a call is in flight on it.

    A call is in flight from the first byte of its message that arrives (or, for a message that was already
    buffered, from the moment its header has been read) until the processor has sent the reply; calls in flight
    are counted in DRAIN. Only this connection's own thread reads, writes and closes the socket; other threads
    may shut it down (which wakes a blocked read with end-of-file)."""

    def __init__(self, sock, registry):
        self.sock = sock
        self.registry = registry
        self.lock = threading.Lock()
        self.in_call = False
        self.closed = False

    def begin_call(self):
        if self.in_call:
            return
        with self.lock:
            if not self.in_call:
                self.in_call = True
                DRAIN.enter()

    def end_call(self):
        with self.lock:
            if self.in_call:
                self.in_call = False
                DRAIN.leave()

    def shutdown_if_idle(self):
        """Draining: end the connection unless a call is in flight (then its thread closes it after the reply)."""
        with self.lock:
            if self.in_call or self.closed:
                return
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        self.end_call()
        with self.lock:
            self.closed = True
        self.registry.discard(self)
        try:
            self.sock.close()
        except OSError:
            pass


class _ThriftRegistry:
    """The open connections (to end the idle ones when draining)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._conns = set()

    def add(self, conn):
        with self._lock:
            self._conns.add(conn)

    def discard(self, conn):
        with self._lock:
            self._conns.discard(conn)

    def snapshot(self):
        with self._lock:
            return list(self._conns)


def _thrift_socket_transport_class(TTransport, max_frame_bytes):
    """The raw transport of an accepted connection: blocking socket reads and writes, marking calls in flight."""
    TTransportException = TTransport.TTransportException

    class SocketTransport(TTransport.TTransportBase):
        def __init__(self, conn):
            self._conn = conn
            self._sock = conn.sock

        def isOpen(self):
            return not self._conn.closed

        def _recv(self, size):
            try:
                data = self._sock.recv(size)
            except OSError as exc:
                raise TTransportException(TTransportException.END_OF_FILE, "connection lost: %s" % exc)
            if not data:
                raise TTransportException(TTransportException.END_OF_FILE, "connection closed by the peer")
            self._conn.begin_call()
            return data

        def read(self, sz):
            return self._recv(max(1, sz))

        def readAll(self, sz):
            # Used for frame lengths and whole frames (framed and header transports): bounded, and gathered in
            # pieces so that memory only grows as bytes arrive.
            if sz < 0:
                raise TTransportException(TTransportException.NEGATIVE_SIZE, "negative frame size %d" % sz)
            if sz > max_frame_bytes:
                raise TTransportException(
                    TTransportException.SIZE_LIMIT,
                    "frame of %d bytes is above the limit of %d (APUS_THRIFT_MAX_FRAME_BYTES)" % (sz, max_frame_bytes),
                )
            parts, have = [], 0
            while have < sz:
                chunk = self._recv(min(sz - have, 1 << 20))
                parts.append(chunk)
                have += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)

        def write(self, buf):
            try:
                self._sock.sendall(buf)
            except OSError as exc:
                raise TTransportException(TTransportException.END_OF_FILE, "cannot send the reply: %s" % exc)

        def flush(self):
            pass

        def close(self):
            self._conn.close()

    return SocketTransport


def _thrift_connection_loop(conn, processor, make_protocols, service_prefix, errors):
    """Serve the calls of one connection, one after the other, until it closes or the instance drains."""
    TTransportException, TProtocolException = errors
    try:
        iprot, oprot = make_protocols(conn)
        read_message_begin = iprot.readMessageBegin

        def message_begin():
            name, message_type, seqid = read_message_begin()
            conn.begin_call()
            if isinstance(name, bytes):  # the old (non-strict) binary form yields bytes in the python library
                name = name.decode("utf-8", "replace")
            if service_prefix and name.startswith(service_prefix):
                name = name[len(service_prefix):]  # "Calculator:add" from a multiplexing client
            return name, message_type, seqid

        iprot.readMessageBegin = message_begin
        while not DRAIN.draining:
            processor.process(iprot, oprot)
            conn.end_call()
    except TTransportException as exc:
        if exc.type != TTransportException.END_OF_FILE:
            _log_err("apus-bootstrap: closed a Thrift connection: %s" % (exc.message or exc))
    except TProtocolException as exc:
        _log_err("apus-bootstrap: closed a Thrift connection: malformed message: %s" % (exc.message or exc))
    except Exception as exc:
        if isinstance(exc, MemoryError):
            _log_err("apus-bootstrap: closed a Thrift connection: out of memory (the instance is at its memory limit)")
        else:
            _log_err("apus-bootstrap: closed a Thrift connection after an error:\n" + traceback.format_exc())
    finally:
        conn.close()


def _serve_thrift(port):
    """Serve the user's Thrift processor on 127.0.0.1:port until SIGTERM/SIGINT; never returns.

    ``APUS_HANDLER`` names a function without arguments that returns the processor, e.g.
    ``Calculator.Processor(Handler())``. Transport (``APUS_THRIFT_TRANSPORT``: framed, buffered or header) and
    protocol (``APUS_THRIFT_PROTOCOL``: binary or compact) are the manifest's. Each connection gets a thread and
    its calls are served in order; readiness is probed by the platform with a TCP connection.
    """
    # A thrift library vendored in the code directory wins over the interpreter's.
    _put_code_dir_first()
    try:
        from thrift.Thrift import TProcessor  # noqa: F401  (the library is there at all)
        from thrift.protocol import TBinaryProtocol, TCompactProtocol
        from thrift.protocol.TProtocol import TProtocolException
        from thrift.transport import TTransport
    except ImportError as exc:
        _fatal("APUS_PROTOCOL=thrift needs the thrift package for %s (Debian: python3-thrift): %s"
               % (sys.executable, exc))

    transport_name = _thrift_choice("APUS_THRIFT_TRANSPORT", THRIFT_TRANSPORTS)
    protocol_name = _thrift_choice("APUS_THRIFT_PROTOCOL", THRIFT_PROTOCOLS)
    max_frame_bytes = _int_from_env("APUS_THRIFT_MAX_FRAME_BYTES", GRPC_DEFAULT_MAX_MESSAGE_BYTES)
    service = os.environ.get("APUS_THRIFT_SERVICE", "").strip()

    header_factory = None
    if transport_name == "header":
        try:
            from thrift.protocol.THeaderProtocol import THeaderProtocolFactory
            from thrift.transport.THeaderTransport import THeaderClientType, THeaderSubprotocolID
        except ImportError as exc:
            _fatal("APUS_THRIFT_TRANSPORT=header needs a thrift package with THeader support (0.13 or later) "
                   "for %s: %s" % (sys.executable, exc))
        subprotocol = THeaderSubprotocolID.COMPACT if protocol_name == "compact" else THeaderSubprotocolID.BINARY
        # Only THeader clients: the declared transport is what the instance speaks.
        header_factory = THeaderProtocolFactory((THeaderClientType.HEADERS,), subprotocol)

    # The accelerated factories use the C extension when the library has it and fall back to pure Python.
    if protocol_name == "compact":
        protocol_factory = TCompactProtocol.TCompactProtocolAcceleratedFactory(fallback=True)
    else:
        protocol_factory = TBinaryProtocol.TBinaryProtocolAcceleratedFactory(fallback=True)
    wrap = TTransport.TFramedTransport if transport_name == "framed" else TTransport.TBufferedTransport
    SocketTransport = _thrift_socket_transport_class(TTransport, max_frame_bytes)

    def make_protocols(conn):
        raw = SocketTransport(conn)
        if header_factory is not None:
            # One protocol for both directions: the reply goes out in the dialect the request came in.
            protocol = header_factory.getProtocol(raw)
            return protocol, protocol
        return protocol_factory.getProtocol(wrap(raw)), protocol_factory.getProtocol(wrap(raw))

    make_processor = _load_handler(HANDLER_SPEC, "Thrift processor")
    try:
        processor = make_processor()
    except BaseException as exc:  # anything the user's function raises, sys.exit() included
        if isinstance(exc, KeyboardInterrupt):
            raise
        _log_err(
            "apus-bootstrap: %s() raised %s: %s (APUS_HANDLER=%r)\n%s"
            % (HANDLER_SPEC, type(exc).__name__, exc, HANDLER_SPEC, _format_user_exception(exc))
        )
        sys.exit(1)
    if not callable(getattr(processor, "process", None)):
        _fatal(
            "%s() returned %s, not a Thrift processor: return one, e.g. Calculator.Processor(Handler()) "
            "(APUS_HANDLER=%r)" % (HANDLER_SPEC, type(processor).__name__, HANDLER_SPEC)
        )

    # Calls named "<service>:<method>" (a multiplexing client) reach a plain processor as "<method>"; a
    # TMultiplexedProcessor the function built itself gets the names unchanged.
    service_prefix = service + ":" if service else ""
    try:
        from thrift.TMultiplexedProcessor import TMultiplexedProcessor

        if isinstance(processor, TMultiplexedProcessor):
            service_prefix = ""
    except ImportError:
        pass

    # Generated processors report handler exceptions through `logging`; make sure they reach stderr.
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((HOST, port))
        listener.listen(128)
    except OSError as exc:
        _fatal("cannot listen on %s:%d: %s" % (HOST, port, exc))
    listener.settimeout(0.25)  # wake up to notice SIGTERM

    stop_requested = threading.Event()

    def on_signal(signum, frame):
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    registry = _ThriftRegistry()
    errors = (TTransport.TTransportException, TProtocolException)
    while not stop_requested.is_set():
        try:
            sock, _ = listener.accept()
        except (socket.timeout, InterruptedError):
            continue
        except OSError as exc:  # e.g. out of file descriptors: keep serving the connections there are
            _log_err("apus-bootstrap: cannot accept a Thrift connection: %s" % exc)
            stop_requested.wait(0.1)
            continue
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = _ThriftConnection(sock, registry)
        registry.add(conn)
        try:
            threading.Thread(
                target=_thrift_connection_loop,
                args=(conn, processor, make_protocols, service_prefix, errors),
                name="apus-thrift",
                daemon=True,
            ).start()
        except (RuntimeError, MemoryError) as exc:
            _log_err(
                "apus-bootstrap: dropped a Thrift connection: cannot start a thread for it (%s: %s); "
                "the instance is at its memory limit" % (type(exc).__name__, exc)
            )
            conn.close()

    # Stop accepting (new connections are refused from here on), end the idle connections, give the calls in
    # flight the grace period (each connection closes once its reply is sent), then leave.
    DRAIN.draining = True
    listener.close()
    for conn in registry.snapshot():
        conn.shutdown_if_idle()
    DRAIN.wait_idle(THRIFT_STOP_GRACE_SECONDS)
    _flush_std_streams()
    os._exit(0)


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Prewarmed mode (APUS_PREWARM=1): the node agent starts this bootstrap before it knows the function, in the
# sandbox an instance gets, with an empty code folder. It loads the libraries instances commonly need, says so,
# and waits on stdin for one JSON line: {"port": N, "env": {...}, "memory": BYTES}. By then the agent has put the
# function's code in the code folder; the process takes the environment, lowers its memory limit and continues
# exactly as a cold-started instance would.
# --------------------------------------------------------------------------

PREWARM_READY_LINE = "apus-prewarm: ready"
# Printed by a specialised HTTP instance once it listens with its handler loaded: the agent takes it as the
# readiness probe's answer (the probe is answered by this bootstrap, not the handler), sparing the probe's polling.
PREWARM_LISTENING_LINE = "apus-prewarm: listening"
SPECIALISED = False


def _preload_libraries():
    """Import what gRPC and Thrift instances need, when installed, so specialising costs the user's code only."""
    for name in ("concurrent.futures", "asyncio", "grpc", "thrift.Thrift", "thrift.protocol.TBinaryProtocol",
                 "thrift.protocol.TCompactProtocol", "thrift.transport.TTransport", "thrift.TMultiplexedProcessor"):
        try:
            __import__(name)
        except Exception:  # absent or broken optional library: the instance reports it if it needs it
            pass


def _wait_for_function():
    _preload_libraries()
    sys.stdout.write(PREWARM_READY_LINE + "\n")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
        os._exit(0)  # the agent closed our stdin without a function: it is shutting down
    try:
        settings = json.loads(line)
        env = settings["env"]
        port = int(settings["port"])
        memory = int(settings.get("memory") or 0)
    except (ValueError, KeyError, TypeError) as exc:
        _fatal("apus-bootstrap: unreadable instance settings from the node agent: %s" % exc, 2)
    global SPECIALISED
    SPECIALISED = True
    os.environ.pop("APUS_PREWARM", None)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.environ["APUS_PORT"] = str(port)
    if memory > 0:
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        except (ImportError, ValueError, OSError) as exc:
            _log_err("apus-bootstrap: cannot lower the memory limit to %d bytes: %s" % (memory, exc))
    _read_instance_configuration()
    import importlib
    importlib.invalidate_caches()  # the code folder was filled after the interpreter started


def main():
    if os.environ.get("APUS_PREWARM") == "1":
        _wait_for_function()
    port = _port_from_env()
    if PROTOCOL == "grpc":
        _serve_grpc(port)
    if PROTOCOL == "thrift":
        _serve_thrift(port)
    if PROTOCOL != "http":
        _fatal("APUS_PROTOCOL=%r is not served by the Python bootstrap (http, grpc or thrift)" % PROTOCOL, 2)
    handler_func = _load_handler(HANDLER_SPEC)
    RequestHandler.handler_func = handler_func

    try:
        server = Server((HOST, port), RequestHandler)
    except OSError as exc:
        _fatal("cannot listen on %s:%d: %s" % (HOST, port, exc))
    if SPECIALISED:
        sys.stdout.write(PREWARM_LISTENING_LINE + "\n")
        sys.stdout.flush()

    def on_signal(signum, frame):
        if DRAIN.draining:
            return
        DRAIN.draining = True
        # shutdown() blocks until serve_forever() returns, so it cannot run on the main thread.
        threading.Thread(target=server.shutdown, name="apus-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # stop accepting: new connections are refused from here on
    DRAIN.wait_idle()
    _flush_std_streams()
    # Idle keep-alive connection threads are daemons; leave without waiting for them.
    os._exit(0)


if __name__ == "__main__":
    main()
