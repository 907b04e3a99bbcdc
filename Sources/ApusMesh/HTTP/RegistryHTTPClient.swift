import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// `ServiceRegistry` over apusd's control API (`/v1/registry/…`, served from the embedded registry): what sidecars
/// and clients use when `--registry http://host:port` names an apusd.
///
/// `watch` long-polls `GET /v1/registry/services/{service}?watch=true&index=N`, which answers once the service's
/// index differs from N or after about 30 s; transient failures are retried with back-off (the stream only ends
/// when the consumer stops).
public struct RegistryHTTPClient: SnapshottingServiceRegistry {
    public let baseURL: String
    let logger: Logger
    /// How long the server holds a watch before answering unchanged.
    public var watchWait: Duration = .seconds(30)
    /// The control-API bearer token sent with every call (a sidecar's `registry:<service>` token); nil: none.
    public var token: String?

    static var http: HTTPClient { MeshHTTP.client }

    public init(baseURL: String, token: String? = nil, logger: Logger) {
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.token = token
        self.logger = logger
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }()

    /// Percent-encodes one path segment (names are already restricted; this keeps odd input from changing the path).
    static func segment(_ text: String) -> String {
        text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~:@"))) ?? text
    }

    struct Reply {
        var status: Int
        var body: Data
    }

    func send(_ method: HTTPMethod, _ path: String, body: Data? = nil, timeout: Duration = .seconds(10)) async throws -> Reply {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = method
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body))
        }
        do {
            let response = try await Self.http.execute(request, timeout: MeshHTTP.timeAmount(timeout))
            let buffer = try await response.body.collect(upTo: 16 << 20)
            return Reply(status: Int(response.status.code), body: Data(buffer: buffer))
        } catch let error as CancellationError {
            throw error
        } catch {
            throw RegistryError.unavailable("\(method) \(baseURL)\(path): \(error)")
        }
    }

    /// The error the API answered with, as a `RegistryError` (404 → leaseNotFound, 4xx → invalid, else unavailable).
    static func failure(_ reply: Reply, lease: String?) -> RegistryError {
        struct Envelope: Decodable {
            struct Inner: Decodable { var code: String; var message: String }
            var error: Inner
        }
        let message = (try? JSONDecoder().decode(Envelope.self, from: reply.body))?.error.message
            ?? String(decoding: reply.body.prefix(300), as: UTF8.self)
        switch reply.status {
        case 404 where lease != nil: return .leaseNotFound(lease!)
        case 400..<500: return .invalid(message)
        default: return .unavailable("HTTP \(reply.status): \(message)")
        }
    }

    func decode<T: Decodable>(_ type: T.Type, _ reply: Reply) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: reply.body)
        } catch {
            throw RegistryError.unavailable("unexpected answer from \(baseURL): \(error)")
        }
    }

    func expect<T: Decodable>(_ type: T.Type, _ reply: Reply, lease: String? = nil) throws -> T {
        guard (200..<300).contains(reply.status) else { throw Self.failure(reply, lease: lease) }
        return try decode(type, reply)
    }

    /// Body of `PUT /v1/registry/services/{service}/endpoints/{id}`.
    struct RegistrationBody: Encodable {
        var address: String
        var port: Int
        var `protocol`: String
        var weight: Int
        var zone: String?
        var metadata: [String: String]
        var healthy: Bool
        var ttlSeconds: Int
    }

    public func register(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int) async throws -> RegistrationLease {
        let body = RegistrationBody(address: endpoint.address, port: endpoint.port, protocol: endpoint.protocol, weight: endpoint.weight,
                                    zone: endpoint.zone, metadata: endpoint.metadata, healthy: endpoint.healthy, ttlSeconds: ttlSeconds)
        let reply = try await send(.PUT, "/v1/registry/services/\(Self.segment(service))/endpoints/\(Self.segment(endpoint.id))",
                                   body: try Self.encoder.encode(body))
        return try expect(RegistrationLease.self, reply)
    }

    public func heartbeat(_ lease: RegistrationLease) async throws {
        let reply = try await send(.POST, "/v1/registry/leases/\(Self.segment(lease.leaseID))/heartbeat")
        _ = try expect(RegistrationLease.self, reply, lease: lease.leaseID)
    }

    public func setHealth(_ lease: RegistrationLease, healthy: Bool) async throws {
        let reply = try await send(.PUT, "/v1/registry/leases/\(Self.segment(lease.leaseID))/health",
                                   body: Data("{\"healthy\":\(healthy)}".utf8))
        guard (200..<300).contains(reply.status) else { throw Self.failure(reply, lease: lease.leaseID) }
    }

    public func deregister(_ lease: RegistrationLease) async throws {
        let reply = try await send(
            .DELETE, "/v1/registry/services/\(Self.segment(lease.service))/endpoints/\(Self.segment(lease.endpointID))?lease=\(Self.segment(lease.leaseID))")
        guard (200..<300).contains(reply.status) else { throw Self.failure(reply, lease: lease.leaseID) }
    }

    public func resolve(_ service: String) async throws -> [ServiceEndpoint] {
        try await snapshot(service).endpoints.map(\.endpoint)
    }

    public func services() async throws -> [ServiceRecord] {
        try await snapshots().map(\.record)
    }

    public func snapshot(_ service: String) async throws -> ServiceSnapshot {
        try expect(ServiceSnapshot.self, try await send(.GET, "/v1/registry/services/\(Self.segment(service))"))
    }

    public func snapshots() async throws -> [ServiceSnapshot] {
        struct Listing: Decodable { var services: [ServiceSnapshot] }
        return try expect(Listing.self, try await send(.GET, "/v1/registry/services")).services
    }

    /// One long-poll: the snapshot once its index differs from `index`, or unchanged after the server's wait.
    public func poll(_ service: String, index: UInt64) async throws -> ServiceSnapshot {
        let seconds = Int(watchWait.components.seconds)
        let reply = try await send(.GET, "/v1/registry/services/\(Self.segment(service))?watch=true&index=\(index)&wait=\(seconds)s",
                                   timeout: watchWait + .seconds(15))
        return try expect(ServiceSnapshot.self, reply)
    }

    public func snapshotChanges(_ service: String) -> AsyncThrowingStream<ServiceSnapshot, any Error> {
        let client = self
        return AsyncThrowingStream { continuation in
            let task = Task {
                var last: ServiceSnapshot?
                var backoff: Duration = .milliseconds(100)
                while !Task.isCancelled {
                    do {
                        let snapshot = if let last { try await client.poll(service, index: last.index) } else { try await client.snapshot(service) }
                        backoff = .milliseconds(100)
                        if last == nil || snapshot.index != last!.index || snapshot.endpoints.map(\.endpoint) != last!.endpoints.map(\.endpoint) {
                            continuation.yield(snapshot)
                        }
                        last = snapshot
                    } catch is CancellationError {
                        break
                    } catch let error as RegistryError where { if case .invalid = error { true } else { false } }() {
                        continuation.finish(throwing: error)
                        return
                    } catch {
                        client.logger.debug("registry watch failed, retrying", metadata: ["service": "\(service)", "error": "\(error)", "retryIn": "\(backoff)"])
                        try? await Task.sleep(for: backoff)
                        backoff = min(backoff * 2, .seconds(5))
                    }
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    public func watch(_ service: String) -> AsyncThrowingStream<[ServiceEndpoint], any Error> {
        let changes = snapshotChanges(service)
        return AsyncThrowingStream { continuation in
            let task = Task {
                var last: [ServiceEndpoint]?
                do {
                    for try await snapshot in changes {
                        let endpoints = snapshot.endpoints.map(\.endpoint)
                        if endpoints != last { continuation.yield(endpoints) }
                        last = endpoints
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
