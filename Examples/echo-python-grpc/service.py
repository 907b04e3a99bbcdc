"""echo.Echo (IDL/examples/echo.proto) as a Python gRPC function.

The Apus bootstrap imports this module and calls ``register(server)`` with a ``grpc.server`` that listens on
$APUS_PORT. Every method honours the request knobs the proto defines:

* ``sleep_ms``: wait before answering, in small steps; a call that is cancelled meanwhile (client cancel or
  deadline) stops waiting and prints ``cancelled <Method> <text>``.
* ``fail_code`` / ``fail_message``: end the call with that gRPC status.
* ``repeat`` (Expand): number of responses, default 1.
* ``response_bytes``: pad the response payload with zero bytes up to that size.

Custom request metadata comes back as ``echo-<key>`` in the initial metadata (with the first response) and in
the trailing metadata.
"""

import os
import time

import grpc

import echo_pb2
import echo_pb2_grpc

INSTANCE = os.environ.get("APUS_INSTANCE", "")
SLEEP_STEP_SECONDS = 0.01

# Request metadata that belongs to the transport or to the platform, not to the caller.
_NOT_ECHOED = {"user-agent", "te", "content-type"}

_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


def _echo_metadata(context):
    echoed = []
    for key, value in context.invocation_metadata():
        key = key.lower()
        if key.startswith(("grpc-", ":", "x-apus-")) or key in _NOT_ECHOED:
            continue
        echoed.append(("echo-" + key, value))  # "k-bin" -> "echo-k-bin": binary keys stay binary
    return tuple(echoed)


class _Call:
    """Per-call helper: metadata echo and the sleep/fail knobs."""

    def __init__(self, method, context):
        self.method = method
        self.context = context
        self.echoed = _echo_metadata(context)
        self.headers_sent = False
        # Trailing metadata is sent with the status, also when the call fails.
        context.set_trailing_metadata(self.echoed)

    def sleep(self, request):
        """Wait request.sleep_ms; False (and a log line) if the call was cancelled meanwhile."""
        if not request.sleep_ms:
            return self.context.is_active()
        end = time.monotonic() + request.sleep_ms / 1000.0
        while True:
            if not self.context.is_active():
                print("cancelled %s %s" % (self.method, request.text), flush=True)
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(SLEEP_STEP_SECONDS, left))

    def fail_if_asked(self, request):
        if request.fail_code:
            status = _STATUS_BY_CODE.get(request.fail_code, grpc.StatusCode.UNKNOWN)
            self.context.abort(status, request.fail_message)  # raises

    def apply_knobs(self, request):
        """Sleep, then fail if asked; False when the call is gone."""
        if not self.sleep(request):
            return False
        self.fail_if_asked(request)
        return True

    def response(self, text, payload, response_bytes, index=0):
        if not self.headers_sent:
            self.context.send_initial_metadata(self.echoed)
            self.headers_sent = True
        if len(payload) < response_bytes:
            payload = payload + bytes(response_bytes - len(payload))
        return echo_pb2.EchoResponse(
            text=text, payload=payload, index=index, instance=INSTANCE, served_by="python"
        )


class Echo(echo_pb2_grpc.EchoServicer):
    def Get(self, request, context):
        call = _Call("Get", context)
        if not call.apply_knobs(request):
            return echo_pb2.EchoResponse()  # the client is gone; nobody reads this
        return call.response(request.text, request.payload, request.response_bytes)

    def Expand(self, request, context):
        call = _Call("Expand", context)
        if not call.apply_knobs(request):
            return
        for index in range(request.repeat or 1):
            if not context.is_active():
                print("cancelled Expand %s" % request.text, flush=True)
                return
            yield call.response(request.text, request.payload, request.response_bytes, index)

    def Collect(self, request_iterator, context):
        call = _Call("Collect", context)
        texts, payloads, response_bytes = [], [], 0
        for request in request_iterator:
            if not call.apply_knobs(request):
                return echo_pb2.EchoResponse()
            texts.append(request.text)
            payloads.append(request.payload)
            response_bytes = max(response_bytes, request.response_bytes)
        return call.response(" ".join(texts), b"".join(payloads), response_bytes, len(texts))

    def Update(self, request_iterator, context):
        call = _Call("Update", context)
        for index, request in enumerate(request_iterator):
            if not call.apply_knobs(request):
                return
            yield call.response(request.text, request.payload, request.response_bytes, index)


def register(server):
    """Called by the Apus bootstrap with the grpc.server it runs."""
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
