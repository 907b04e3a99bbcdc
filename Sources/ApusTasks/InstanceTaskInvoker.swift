import ApusCore
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import NIOPosix

/// Sends task attempts to instances on loopback, in the function's protocol:
/// * HTTP: the submitted method (POST by default) to the submitted path with the payload, plus `X-Apus-Task-Id`,
///   `X-Apus-Attempt` and `X-Apus-Progress-Url`. 2xx succeeds (the body is the result); 429 and 5xx are retried;
///   other statuses fail the task at once (a retry cannot change them).
/// * gRPC: the submitted unary method over h2c with the submitted request message, the same values as metadata.
///   Status 0 succeeds (the response message is the result); UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, INTERNAL,
///   UNKNOWN and DEADLINE_EXCEEDED are retried, others fail at once.
/// * Thrift: the oneway message in the instance's transport, then the connection's write side is closed; the
///   attempt succeeds when the instance has read it and closed the connection (it processed the call).
public final class InstanceTaskInvoker: TaskInvoker {
    private let client: HTTPClient
    private let group: any EventLoopGroup

    public init(group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.group = group
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        configuration.timeout = .init(connect: .seconds(5), read: nil)
        configuration.decompression = .disabled
        client = HTTPClient(eventLoopGroupProvider: .shared(group), configuration: configuration)
    }

    public func shutdown() async {
        try? await client.shutdown()
    }

    public func invoke(_ invocation: TaskInvocation) async -> InvocationResult {
        switch invocation.task.kind {
        case .http: return await invokeHTTP(invocation)
        case .grpc: return await invokeGRPC(invocation)
        case .thrift: return await invokeThrift(invocation)
        }
    }

    private static func failure(_ error: any Error, _ what: String) -> InvocationResult {
        if Task.isCancelled { return InvocationResult(outcome: .aborted) }
        let text = "\(error)"
        let refused = text.contains("connectTimeout") || text.contains("connection refused") || text.contains("Connection refused")
        var reason = text
        if text.contains("remoteConnectionClosed") || text.contains("ioOnClosedChannel") || text.contains("Connection reset") {
            reason = "the instance closed the connection before answering (did it crash?)"
        } else if refused {
            reason = "the instance refused the connection"
        }
        return InvocationResult(outcome: .failed("\(what): \(reason)", retryable: true), unreachable: refused)
    }

    // MARK: HTTP

    private func invokeHTTP(_ invocation: TaskInvocation) async -> InvocationResult {
        let task = invocation.task
        var request = HTTPClientRequest(url: "http://\(invocation.endpoint)\(task.path.hasPrefix("/") ? task.path : "/" + task.path)")
        request.method = HTTPMethod(rawValue: task.method)
        if let contentType = task.contentType { request.headers.add(name: "Content-Type", value: contentType) }
        request.headers.add(name: "X-Apus-Task-Id", value: task.id)
        request.headers.add(name: "X-Apus-Attempt", value: String(invocation.attempt))
        request.headers.add(name: "X-Apus-Progress-Url", value: invocation.progressURL)
        request.headers.add(name: "X-Apus-Request-Id", value: "\(task.id)-\(invocation.attempt)")
        request.headers.add(name: "X-Apus-Function", value: invocation.version.function)
        request.headers.add(name: "X-Apus-Version", value: String(invocation.version.number))
        request.headers.add(name: "X-Apus-Deadline-Ms", value: String(Int64((Date().timeIntervalSince1970 + invocation.timeout) * 1000)))
        request.headers.add(name: "Content-Length", value: String(invocation.payload.count))
        request.body = .bytes(ByteBuffer(bytes: invocation.payload))
        do {
            let response = try await client.execute(request, timeout: .milliseconds(Int64(invocation.timeout * 1000) + 1000))
            var body: [UInt8] = []
            var tooLarge = false
            for try await chunk in response.body {
                if body.count + chunk.readableBytes > invocation.resultLimit {
                    tooLarge = true
                    break
                }
                body += chunk.readableBytesView
            }
            let status = Int(response.status.code)
            if tooLarge, (200..<300).contains(status) { return .resultTooLarge(invocation.resultLimit, statusCode: status) }
            let contentType = response.headers.first(name: "Content-Type")
            if (200..<300).contains(status) {
                return InvocationResult(outcome: .succeeded, result: body, contentType: contentType, statusCode: status)
            }
            let excerpt = String(decoding: body.prefix(500), as: UTF8.self)
            let retryable = status == 429 || status >= 500
            return InvocationResult(outcome: .failed("function answered HTTP \(status)\(excerpt.isEmpty ? "" : ": \(excerpt)")", retryable: retryable),
                                    result: tooLarge ? nil : body, contentType: contentType, statusCode: status)
        } catch {
            return Self.failure(error, "instance \(invocation.instanceID) failed")
        }
    }

    // MARK: gRPC

    private static let retryableGRPC: Set<Int> = [1, 2, 4, 8, 10, 13, 14]

    private func invokeGRPC(_ invocation: TaskInvocation) async -> InvocationResult {
        let task = invocation.task
        do {
            let (connection, multiplexer) = try await ClientBootstrap(group: group)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .connectTimeout(.seconds(5))
                .connect(host: invocation.endpoint.host, port: invocation.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        (channel, try channel.pipeline.syncOperations.configureAsyncHTTP2Pipeline(mode: .client) { stream in
                            stream.eventLoop.makeSucceededVoidFuture()
                        })
                    }
                }
            defer { connection.close(promise: nil) }
            let stream = try await multiplexer.openStream { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<HTTP2Frame.FramePayload, HTTP2Frame.FramePayload>(wrappingChannelSynchronously: channel)
                }
            }
            let timeoutMs = max(1, Int64(invocation.timeout * 1000))
            let headers: HPACKHeaders = [
                ":method": "POST", ":scheme": "http", ":path": task.method, ":authority": "\(invocation.endpoint)",
                "content-type": task.contentType ?? "application/grpc", "te": "trailers",
                "grpc-timeout": "\(min(timeoutMs, 99_999_999))m",
                "apus-task-id": task.id, "apus-attempt": String(invocation.attempt), "apus-progress-url": invocation.progressURL,
                "x-apus-request-id": "\(task.id)-\(invocation.attempt)",
            ]
            let payload = invocation.payload
            let limit = invocation.resultLimit
            return try await stream.executeThenClose { inbound, outbound in
                try await outbound.write(.headers(.init(headers: headers)))
                try await outbound.write(.data(.init(data: .byteBuffer(ByteBuffer(bytes: payload)), endStream: true)))
                var body: [UInt8] = []
                var status: Int?
                var message: String?
                var contentType: String?
                var tooLarge = false
                frames: for try await frame in inbound {
                    switch frame {
                    case .headers(let h):
                        if let s = h.headers.first(name: "grpc-status") { status = Int(s) }
                        if let m = h.headers.first(name: "grpc-message") { message = m.removingPercentEncoding ?? m }
                        if let c = h.headers.first(name: "content-type") { contentType = c }
                        if h.endStream { break frames }
                    case .data(let d):
                        if case .byteBuffer(let buffer) = d.data {
                            if body.count + buffer.readableBytes > limit + 5 { tooLarge = true } else { body += buffer.readableBytesView }
                        }
                        if d.endStream { break frames }
                    case .rstStream(let code):
                        return InvocationResult(outcome: .failed("instance reset the gRPC stream (\(code))", retryable: true))
                    default:
                        break
                    }
                }
                guard let status else {
                    return InvocationResult(outcome: .failed("instance ended the gRPC call without a status", retryable: true))
                }
                if status == 0 {
                    if tooLarge { return .resultTooLarge(limit, statusCode: 0) }
                    // The result is the response message without its 5-byte gRPC prefix (when it is one message).
                    var result = body
                    if body.count >= 5 {
                        let length = Int(body[1]) << 24 | Int(body[2]) << 16 | Int(body[3]) << 8 | Int(body[4])
                        if length == body.count - 5 { result = Array(body[5...]) }
                    }
                    return InvocationResult(outcome: .succeeded, result: result, contentType: contentType, statusCode: 0)
                }
                return InvocationResult(
                    outcome: .failed("function answered gRPC status \(status)\(message.map { ": \($0)" } ?? "")", retryable: Self.retryableGRPC.contains(status)),
                    statusCode: status)
            }
        } catch {
            return Self.failure(error, "gRPC call to instance \(invocation.instanceID) failed")
        }
    }

    // MARK: Thrift

    private func invokeThrift(_ invocation: TaskInvocation) async -> InvocationResult {
        let transport = invocation.version.manifest.thrift?.transport ?? .framed
        let compact = invocation.task.contentType?.contains("compact") ?? false
        let message = invocation.payload
        var framed = ByteBuffer()
        switch transport {
        case .buffered:
            framed.writeBytes(message)
        case .framed:
            framed.writeInteger(UInt32(message.count))
            framed.writeBytes(message)
        case .header:
            // THeader: protocol id (0 binary, 2 compact), no transforms, padded to 4 bytes.
            var header: [UInt8] = [compact ? 2 : 0, 0]
            while header.count % 4 != 0 { header.append(0) }
            framed.writeInteger(UInt32(10 + header.count + message.count))
            framed.writeInteger(UInt16(0x0FFF))
            framed.writeInteger(UInt16(0))
            framed.writeInteger(Int32(0))
            framed.writeInteger(UInt16(header.count / 4))
            framed.writeBytes(header)
            framed.writeBytes(message)
        }
        let outgoing = framed
        do {
            let channel = try await ClientBootstrap(group: group)
                .connectTimeout(.seconds(5))
                .channelOption(.allowRemoteHalfClosure, value: true)
                .connect(host: invocation.endpoint.host, port: invocation.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true))
                    }
                }
            try await channel.executeThenClose { inbound, outbound in
                try await outbound.write(outgoing)
                outbound.finish()
                // A oneway call has no reply: the instance closing the connection after our end of input means it
                // has processed the message.
                for try await _ in inbound {}
            }
            return InvocationResult(outcome: .succeeded)
        } catch {
            return Self.failure(error, "Thrift call to instance \(invocation.instanceID) failed")
        }
    }
}
