"""gRPC's own interop test service behind the gateway: Tests/Integration/functions/grpc-interop serves
grpc.testing.TestService (gRPC's published test.proto, IDL/grpc-testing) and a grpcio client calls it on the
gateway's HTTP port with the requests of gRPC's interop test cases (empty_unary, large_unary, client_streaming,
server_streaming, ping_pong, empty_stream, custom_metadata, status_code_and_message, special_status_message,
unimplemented_method, unimplemented_service).

It also pins down which grpc.* services are whose: a function may declare any service of the grpc.* packages
(grpc.testing.TestService here) except the three the gateway answers itself (grpc.health.v1.Health,
grpc.reflection.v1.ServerReflection, grpc.reflection.v1alpha.ServerReflection), which are refused at deploy; the
gateway's health and reflection keep answering beside the function.
"""

from __future__ import annotations

import queue
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apus_testlib import FUNCTIONS_DIR, assert_error, tar_gz_dir
from grpc_support import CALL_TIMEOUT, insecure_channel, metadata_dict, queued_requests
from test_grpc import _fields

INTEROP_DIR = FUNCTIONS_DIR / "grpc-interop"
INTEROP_FUNCTION = "grpc-interop"
TEST_SERVICE = "grpc.testing.TestService"
GATEWAY_SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"]

# The generated modules are committed beside the function (Scripts/gen-proto); import them without leaving a
# __pycache__ in the function's directory (it would be deployed with it).
if str(INTEROP_DIR) not in sys.path:
    sys.path.insert(0, str(INTEROP_DIR))
_dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
try:
    import empty_pb2  # noqa: E402
    import messages_pb2  # noqa: E402
    import test_pb2_grpc  # noqa: E402
finally:
    sys.dont_write_bytecode = _dont_write_bytecode

# The sizes of gRPC's interop test cases (doc/interop-test-descriptions.md).
LARGE_REQUEST, LARGE_RESPONSE = 271828, 314159
STREAM_REQUEST_SIZES = [27182, 8, 1828, 45904]
STREAM_RESPONSE_SIZES = [31415, 9, 2653, 58979]
SPECIAL_STATUS_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"


def payload(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=bytes(size))


def output_request(*sizes: int, status: tuple | None = None) -> messages_pb2.StreamingOutputCallRequest:
    request = messages_pb2.StreamingOutputCallRequest(
        response_parameters=[messages_pb2.ResponseParameters(size=size) for size in sizes])
    if status is not None:
        request.response_status.code, request.response_status.message = status
    return request


@pytest.fixture(scope="module")
def interop_fn(deployed):
    return deployed(INTEROP_DIR)


@pytest.fixture(scope="module")
def channel(apusd):
    ch = insecure_channel(apusd)
    yield ch
    ch.close()


@pytest.fixture
def stub(channel, interop_fn):
    return test_pb2_grpc.TestServiceStub(channel)


# ---- deploy --------------------------------------------------------------------------------------------------


def test_function_declaring_grpc_testing_service_is_deployed(apusd, deployed, interop_fn):
    doc = apusd.api_json("GET", f"/v1/functions/{INTEROP_FUNCTION}")
    [version] = doc["versions"]
    assert version["manifest"]["protocol"] == "grpc", version["manifest"]
    assert version["manifest"]["grpc"]["services"] == [TEST_SERVICE], version["manifest"]
    assert doc["release"]["weights"] == [{"version": 1, "weight": 100}]


# ---- the interop test cases ------------------------------------------------------------------------------------


def test_empty_unary(stub):
    response, call = stub.EmptyCall.with_call(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert response == empty_pb2.Empty() and call.code() == grpc.StatusCode.OK


def test_large_unary(apusd, stub):
    request = messages_pb2.SimpleRequest(response_size=LARGE_RESPONSE, payload=payload(LARGE_REQUEST),
                                         fill_server_id=True)
    response = stub.UnaryCall(request, timeout=CALL_TIMEOUT)
    assert response.payload.type == messages_pb2.COMPRESSABLE
    assert len(response.payload.body) == LARGE_RESPONSE and response.payload.body == bytes(LARGE_RESPONSE)
    instances = {i["id"] for i in apusd.api_json("GET", f"/v1/functions/{INTEROP_FUNCTION}/instances")["instances"]}
    assert response.server_id in instances, f"server_id {response.server_id!r} is none of {instances}"


def test_unary_without_response_size_echoes_the_payload(stub):
    body = bytes(range(256)) * 40
    request = messages_pb2.SimpleRequest(payload=messages_pb2.Payload(body=body))
    assert stub.UnaryCall(request, timeout=CALL_TIMEOUT).payload.body == body


def test_server_streaming(stub):
    sizes = STREAM_RESPONSE_SIZES[:3]
    responses = stub.StreamingOutputCall(output_request(*sizes), timeout=CALL_TIMEOUT)
    assert [len(m.payload.body) for m in responses] == sizes
    assert responses.code() == grpc.StatusCode.OK


def test_client_streaming(stub):
    requests = [messages_pb2.StreamingInputCallRequest(payload=payload(n)) for n in STREAM_REQUEST_SIZES]
    response = stub.StreamingInputCall(iter(requests), timeout=CALL_TIMEOUT)
    assert response.aggregated_payload_size == sum(STREAM_REQUEST_SIZES) == 74922


def test_ping_pong(stub):
    """FullDuplexCall, three messages: each response arrives before the next request is sent."""
    outgoing: queue.Queue = queue.Queue()

    responses = stub.FullDuplexCall(queued_requests(outgoing), timeout=CALL_TIMEOUT)
    try:
        for request_size, response_size in list(zip(STREAM_REQUEST_SIZES, STREAM_RESPONSE_SIZES))[:3]:
            request = output_request(response_size)
            request.payload.CopyFrom(payload(request_size))
            outgoing.put(request)
            assert len(next(responses).payload.body) == response_size
    finally:
        outgoing.put(None)
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


def test_half_duplex(stub):
    responses = stub.HalfDuplexCall(iter([output_request(5), output_request(6, 7), output_request()]),
                                    timeout=CALL_TIMEOUT)
    assert [len(m.payload.body) for m in responses] == [5, 6, 7]


def test_empty_stream(stub):
    responses = stub.FullDuplexCall(iter([]), timeout=CALL_TIMEOUT)
    assert list(responses) == [] and responses.code() == grpc.StatusCode.OK


def test_custom_metadata(stub):
    initial = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
    trailing = ("x-grpc-test-echo-trailing-bin", b"\x0a\x0b\x0a\x0b\x0a\x0b")
    request = messages_pb2.SimpleRequest(response_size=LARGE_RESPONSE, payload=payload(LARGE_REQUEST))
    response, call = stub.UnaryCall.with_call(request, metadata=[initial, trailing], timeout=CALL_TIMEOUT)
    assert len(response.payload.body) == LARGE_RESPONSE
    assert metadata_dict(call.initial_metadata()).get(initial[0]) == initial[1], call.initial_metadata()
    assert metadata_dict(call.trailing_metadata()).get(trailing[0]) == trailing[1], call.trailing_metadata()

    responses = stub.FullDuplexCall(iter([output_request(LARGE_RESPONSE)]), metadata=[initial, trailing],
                                    timeout=CALL_TIMEOUT)
    assert metadata_dict(responses.initial_metadata()).get(initial[0]) == initial[1]
    assert [len(m.payload.body) for m in responses] == [LARGE_RESPONSE]
    assert metadata_dict(responses.trailing_metadata()).get(trailing[0]) == trailing[1]


@pytest.mark.parametrize("code,message,expected", [
    (3, "x", grpc.StatusCode.INVALID_ARGUMENT),
    (2, "test status message", grpc.StatusCode.UNKNOWN),
    (2, SPECIAL_STATUS_MESSAGE, grpc.StatusCode.UNKNOWN),
], ids=["invalid-argument", "status_code_and_message", "special_status_message"])
def test_status_code_and_message(stub, code, message, expected):
    request = messages_pb2.SimpleRequest(response_status=messages_pb2.EchoStatus(code=code, message=message))
    with pytest.raises(grpc.RpcError) as err:
        stub.UnaryCall(request, timeout=CALL_TIMEOUT)
    assert (err.value.code(), err.value.details()) == (expected, message), err.value

    with pytest.raises(grpc.RpcError) as err:
        list(stub.FullDuplexCall(iter([output_request(status=(code, message))]), timeout=CALL_TIMEOUT))
    assert (err.value.code(), err.value.details()) == (expected, message), err.value


def test_status_after_streamed_messages(stub):
    responses = stub.StreamingOutputCall(output_request(1, 2, 3, status=(9, "after three")), timeout=CALL_TIMEOUT)
    assert [len(next(responses).payload.body) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "after three")


def test_unimplemented_method(stub):
    """TestService/UnimplementedCall reaches the function, whose servicer leaves it UNIMPLEMENTED."""
    with pytest.raises(grpc.RpcError) as err:
        stub.UnimplementedCall(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value


def test_unimplemented_service(channel, interop_fn):
    """grpc.testing.UnimplementedService (same proto, declared by no function): UNIMPLEMENTED from the gateway."""
    with pytest.raises(grpc.RpcError) as err:
        test_pb2_grpc.UnimplementedServiceStub(channel).UnimplementedCall(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value


# ---- the gateway's own grpc.* services beside the function -------------------------------------------------------


def test_gateway_health_still_answered_by_the_gateway(channel, interop_fn, stub):
    """The function's servicer has no health service; SERVING comes from the gateway (for "" and for the function's
    service), and an unknown service is NOT_FOUND as before."""
    assert stub.EmptyCall(empty_pb2.Empty(), timeout=CALL_TIMEOUT) == empty_pb2.Empty()
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service=TEST_SERVICE), timeout=CALL_TIMEOUT).status == serving
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="grpc.testing.UnimplementedService"), timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_grpc_testing_service(channel, interop_fn, version):
    info = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    list_services = bytes([0x3A, 0x00])  # ServerReflectionRequest{list_services: ""}
    [response] = list(info(iter([list_services]), timeout=CALL_TIMEOUT))
    listed = dict(_fields(response))
    names = {dict(_fields(service))[1].decode() for number, service in _fields(listed[6]) if number == 1}
    assert {TEST_SERVICE, "grpc.health.v1.Health", f"grpc.reflection.{version}.ServerReflection"} <= names, names


# ---- what stays the gateway's ----------------------------------------------------------------------------------


def _manifest(name: str, services: list) -> str:
    return (f"name: {name}\nruntime: python3\nprotocol: grpc\nhandler: service.register\n"
            f"grpc:\n  services: [{', '.join(services)}]\n")


def _assert_not_created(apusd, name):
    assert name not in [f["name"] for f in apusd.api_json("GET", "/v1/functions")["functions"]]
    assert_error(apusd.api_call("GET", f"/v1/functions/{name}"), 404, "not_found")


@pytest.mark.parametrize("service", GATEWAY_SERVICES)
def test_gateway_services_are_refused_at_deploy(apusd, tmp_path, service):
    name = "claims-" + service.split(".")[1] + "-" + service.split(".")[2].lower()
    func_dir = tmp_path / name
    func_dir.mkdir()
    (func_dir / "service.py").write_text("def register(server):\n    pass\n")
    # Beside a service the function may have, and alone.
    for services in ([TEST_SERVICE.replace("TestService", "Other"), service], [service]):
        (func_dir / "apus.yaml").write_text(_manifest(name, services))
        rc, out, err = apusd.cli("deploy", func_dir)
        assert rc == 1, f"a function declaring {service} was deployed (rc {rc}):\n{out}{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("apus: error: "), f"expected one error line, got {err!r}"
        assert service in lines[0] and "gateway" in lines[0], f"the refusal names neither {service} nor the gateway: {lines[0]!r}"
        _assert_not_created(apusd, name)

        r = apusd.api_call("POST", "/v1/functions", body=tar_gz_dir(func_dir),
                           headers={"Content-Type": "application/gzip"})
        message = assert_error(r, 400, "bad_request")["message"]
        assert service in message and "gateway" in message, message
        _assert_not_created(apusd, name)
