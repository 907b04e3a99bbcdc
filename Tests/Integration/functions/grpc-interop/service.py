"""grpc.testing.TestService (gRPC's interop test service, IDL/grpc-testing/grpc/testing/test.proto) as a Python
gRPC function.

The Apus bootstrap imports this module and calls ``register(server)`` with a ``grpc.server`` that listens on
$APUS_PORT. The methods behave like gRPC's own interop test server, so the requests of gRPC's interop test cases
get the answers those cases expect:

* ``EmptyCall``: an empty response.
* ``UnaryCall``: a payload of ``response_size`` zero bytes; with ``response_size`` 0 the request's payload comes
  back unchanged. ``fill_server_id`` puts the instance id ($APUS_INSTANCE) in ``server_id``.
* ``StreamingOutputCall``: one response per ``response_parameters`` entry, with ``size`` zero bytes, after
  ``interval_us``.
* ``StreamingInputCall``: ``aggregated_payload_size``, the sum of the request payloads' sizes.
* ``FullDuplexCall``: for each request as it arrives, its responses (as StreamingOutputCall).
* ``HalfDuplexCall``: reads every request first, then sends all their responses in order.
* ``response_status`` (UnaryCall, StreamingOutputCall, FullDuplexCall, HalfDuplexCall): a non-zero code ends the
  call with that status code and message.
* Metadata: ``x-grpc-test-echo-initial`` comes back in the initial metadata, ``x-grpc-test-echo-trailing-bin`` in
  the trailing metadata (the interop "custom_metadata" case).
* ``UnimplementedCall`` and ``CacheableUnaryCall`` are left to the generated base class: UNIMPLEMENTED.
"""

import os
import time

import grpc

import empty_pb2
import messages_pb2
import test_pb2_grpc

INSTANCE = os.environ.get("APUS_INSTANCE", "")
ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"

_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


def _echo_metadata(context):
    """Send back the interop suite's echo headers: initial now, trailing with the status (also on failure)."""
    initial, trailing = [], []
    for key, value in context.invocation_metadata():
        if key == ECHO_INITIAL:
            initial.append((key, value))
        elif key == ECHO_TRAILING:
            trailing.append((key, value))
    if initial:
        context.send_initial_metadata(tuple(initial))
    if trailing:
        context.set_trailing_metadata(tuple(trailing))


def _fail_if_asked(request, context):
    """End the call with request.response_status when its code is not OK (raises)."""
    if request.HasField("response_status") and request.response_status.code != 0:
        status = _STATUS_BY_CODE.get(request.response_status.code, grpc.StatusCode.UNKNOWN)
        context.abort(status, request.response_status.message)


def _payload(size):
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=bytes(size))


def _responses(request, context):
    """The responses one StreamingOutputCallRequest asks for, each after its interval."""
    for parameters in request.response_parameters:
        if parameters.interval_us:
            time.sleep(parameters.interval_us / 1_000_000)
        if not context.is_active():
            return
        yield messages_pb2.StreamingOutputCallResponse(payload=_payload(parameters.size))


class TestService(test_pb2_grpc.TestServiceServicer):
    def EmptyCall(self, request, context):
        _echo_metadata(context)
        return empty_pb2.Empty()

    def UnaryCall(self, request, context):
        _echo_metadata(context)
        _fail_if_asked(request, context)
        if request.response_size:
            payload = _payload(request.response_size)
        else:
            payload = messages_pb2.Payload(type=request.payload.type, body=request.payload.body)
        response = messages_pb2.SimpleResponse(payload=payload)
        if request.fill_server_id:
            response.server_id = INSTANCE
        return response

    def StreamingOutputCall(self, request, context):
        _echo_metadata(context)
        yield from _responses(request, context)
        _fail_if_asked(request, context)

    def StreamingInputCall(self, request_iterator, context):
        _echo_metadata(context)
        total = sum(len(request.payload.body) for request in request_iterator)
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=total)

    def FullDuplexCall(self, request_iterator, context):
        _echo_metadata(context)
        for request in request_iterator:
            yield from _responses(request, context)
            _fail_if_asked(request, context)

    def HalfDuplexCall(self, request_iterator, context):
        _echo_metadata(context)
        requests = list(request_iterator)
        for request in requests:
            yield from _responses(request, context)
            _fail_if_asked(request, context)


def register(server):
    """Called by the Apus bootstrap with the grpc.server it runs."""
    test_pb2_grpc.add_TestServiceServicer_to_server(TestService(), server)
