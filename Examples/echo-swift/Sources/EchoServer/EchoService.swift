#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import GRPCCore

/// `echo.Echo` (IDL/examples/echo.proto): one method per call shape. Every request's knobs apply when that request
/// is answered (see EchoService+Knobs.swift), and the caller's custom metadata comes back as `echo-<key>` in both the
/// initial and the trailing metadata.
struct EchoService: Echo_Echo.ServiceProtocol {
    /// `$APUS_INSTANCE`, reported in every response.
    let instance: String
    /// Set once the server drains: in-flight calls then finish instead of stopping at their cancellation hint.
    let draining: Draining

    /// Unary: one response, after the request's knobs.
    func get(
        request: ServerRequest<Echo_EchoRequest>,
        context: ServerContext
    ) async throws -> ServerResponse<Echo_EchoResponse> {
        let echoed = request.metadata.echoed()
        try await self.applyKnobs(of: request.message, method: "Get", context: context, trailers: echoed)
        return ServerResponse(
            message: self.response(to: request.message, index: 0),
            metadata: echoed,
            trailingMetadata: echoed
        )
    }

    /// Server streaming: `repeat` responses (at least one), index 0 up, after the request's knobs. Each write waits
    /// for the client to make room (HTTP/2 flow control), so a slow reader slows the stream down.
    func expand(
        request: ServerRequest<Echo_EchoRequest>,
        context: ServerContext
    ) async throws -> StreamingServerResponse<Echo_EchoResponse> {
        let echoed = request.metadata.echoed()
        let message = request.message
        try await self.applyKnobs(of: message, method: "Expand", context: context, trailers: echoed)
        let count = max(message.repeat, 1)
        return StreamingServerResponse(metadata: echoed) { writer in
            for index in 0..<count {
                try self.checkCancellation(context)
                try await writer.write(self.response(to: message, index: index))
            }
            return echoed
        }
    }

    /// Client streaming: one response whose text joins the requests' texts with spaces, whose payload is their
    /// payloads in order (padded to the largest `response_bytes` asked), and whose index is how many there were.
    func collect(
        request: StreamingServerRequest<Echo_EchoRequest>,
        context: ServerContext
    ) async throws -> ServerResponse<Echo_EchoResponse> {
        let echoed = request.metadata.echoed()
        var texts: [String] = []
        var payload = Data()
        var responseBytes: UInt32 = 0
        for try await message in request.messages {
            try await self.applyKnobs(of: message, method: "Collect", context: context, trailers: echoed)
            texts.append(message.text)
            payload.append(message.payload)
            responseBytes = max(responseBytes, message.responseBytes)
        }
        var collected = Echo_EchoRequest()
        collected.text = texts.joined(separator: " ")
        collected.payload = payload
        collected.responseBytes = responseBytes
        return ServerResponse(
            message: self.response(to: collected, index: UInt32(texts.count)),
            metadata: echoed,
            trailingMetadata: echoed
        )
    }

    /// Bidirectional: answers each request as it arrives, after its knobs; index counts the responses. A request
    /// with `fail_code` ends the call there, after the responses already sent.
    func update(
        request: StreamingServerRequest<Echo_EchoRequest>,
        context: ServerContext
    ) async throws -> StreamingServerResponse<Echo_EchoResponse> {
        let echoed = request.metadata.echoed()
        return StreamingServerResponse(metadata: echoed) { writer in
            var index: UInt32 = 0
            for try await message in request.messages {
                try await self.applyKnobs(of: message, method: "Update", context: context, trailers: echoed)
                try await writer.write(self.response(to: message, index: index))
                index += 1
            }
            return echoed
        }
    }

    /// The answer to one request: its text, its payload padded with zero bytes to `response_bytes`, who answered.
    private func response(to request: Echo_EchoRequest, index: UInt32) -> Echo_EchoResponse {
        var response = Echo_EchoResponse()
        response.text = request.text
        response.payload = request.payload
        let padding = Int(request.responseBytes) - request.payload.count
        if padding > 0 {
            response.payload.append(Data(count: padding))
        }
        response.index = index
        response.instance = self.instance
        response.servedBy = "swift"
        return response
    }
}
