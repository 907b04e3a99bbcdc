import ApusCore
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1

/// Sends one request to an instance over pooled HTTP/1.1 keep-alive connections and reads its whole answer.
final class InstanceForwarder: Sendable {
    struct Answer: Sendable {
        var status: Int
        var headers: [(String, String)]
        var body: ByteBuffer
    }

    let client: HTTPClient
    let maxResponseBytes: Int

    init(maxResponseBytes: Int) {
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 1024)
        // A refused connection means the instance is gone: answer 502 now instead of retrying until the deadline.
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.decompression = .disabled
        configuration.redirectConfiguration = .disallow
        configuration.httpVersion = .http1Only
        configuration.timeout = .init(connect: .seconds(2))
        self.client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        self.maxResponseBytes = maxResponseBytes
    }

    func shutdown() async {
        try? await client.shutdown()
    }

    /// Hop-by-hop headers never cross the proxy (RFC 9110 §7.6.1).
    static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authenticate", "proxy-authorization", "host", "content-length",
    ]

    func forward(_ invocation: Invocation, body: ByteBuffer, port: Int) async throws(ApusError) -> Answer {
        let deadline = invocation.deadline ?? .now
        var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(invocation.path)")
        request.method = HTTPMethod(rawValue: invocation.method)
        var outgoing = HTTPHeaders()
        for (name, value) in invocation.metadata { outgoing.add(name: name, value: value) }
        request.headers = outgoing
        if body.readableBytes > 0 || !["GET", "HEAD", "DELETE", "OPTIONS"].contains(invocation.method) {
            request.body = .bytes(body)
        }
        let remaining = ContinuousClock.now.duration(to: deadline)
        guard remaining > .zero else {
            throw ApusError(.deadlineExceeded, "deadline passed before the request reached an instance")
        }
        let nioDeadline = NIODeadline.now() + .milliseconds(remaining.milliseconds)
        do {
            let response = try await client.execute(request, deadline: nioDeadline)
            let payload = try await response.body.collect(upTo: maxResponseBytes)
            return Answer(
                status: Int(response.status.code),
                headers: response.headers.map { ($0.name, $0.value) },
                body: payload)
        } catch let error as ApusError {
            throw error
        } catch {
            if ContinuousClock.now >= deadline {
                throw ApusError(.deadlineExceeded, "function did not answer within its timeout")
            }
            if let clientError = error as? HTTPClientError, clientError == .deadlineExceeded {
                throw ApusError(.deadlineExceeded, "function did not answer within its timeout")
            }
            if error is NIOTooManyBytesError {
                throw ApusError(.instanceError, "function answer exceeds \(maxResponseBytes) bytes")
            }
            throw ApusError(.instanceError, "instance failed while serving the request: \(error)")
        }
    }
}
