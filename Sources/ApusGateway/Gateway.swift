import ApusCore
import ApusScheduler
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore

/// Per-request context of the edge: remembers the peer address for `X-Forwarded-For`.
public struct GatewayRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public let remoteAddress: SocketAddress?

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
    }
}

/// The HTTP edge: route, pick a version, hold a slot, forward, answer.
public struct GatewayResponder: HTTPResponder {
    public typealias Context = GatewayRequestContext

    public struct Configuration: Sendable {
        /// Host routing: `<function>.<domain>`.
        public var domain: String
        public var maxRequestBytes: Int
        public var maxResponseBytes: Int

        public init(domain: String = "apus.localhost", maxRequestBytes: Int = 32 << 20, maxResponseBytes: Int = 64 << 20) {
            self.domain = domain
            self.maxRequestBytes = maxRequestBytes
            self.maxResponseBytes = maxResponseBytes
        }
    }

    let configuration: Configuration
    let scheduler: Scheduler
    let forwarder: InstanceForwarder
    let logger: Logger

    init(configuration: Configuration, scheduler: Scheduler, forwarder: InstanceForwarder, logger: Logger) {
        self.configuration = configuration
        self.scheduler = scheduler
        self.forwarder = forwarder
        self.logger = logger
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        let requestID = Identifier.make(prefix: "r-", length: 12)
        do {
            return try await serve(request, context: context, requestID: requestID)
        } catch {
            logger.info("request failed", metadata: ["requestID": "\(requestID)", "code": "\(error.code)", "reason": "\(error.message)"])
            return Self.errorResponse(error, requestID: requestID)
        }
    }

    static func errorResponse(_ error: ApusError, requestID: String, version: Int? = nil) -> Response {
        var headers: HTTPFields = [.contentType: "application/json", HTTPField.Name("X-Apus-Request-Id")!: requestID]
        if let version { headers[HTTPField.Name("X-Apus-Version")!] = String(version) }
        if error.code == .overloaded || error.code == .unavailable { headers[.retryAfter] = "1" }
        return Response(
            status: .init(code: error.code.httpStatus),
            headers: headers,
            body: .init(byteBuffer: ByteBuffer(string: error.jsonBody + "\n")))
    }

    /// Decodes only what routing needs into the neutral invocation head; the body stays opaque.
    func decode(_ request: Request, context: Context, requestID: String) throws(ApusError) -> Invocation {
        let host = request.head.authority
        let route = try GatewayRoute.resolve(host: host, uri: request.uri.description, domain: configuration.domain)
        var pinned: Int?
        if let text = request.headers[HTTPField.Name("X-Apus-Version")!] {
            guard let number = Int(text.trimmingCharacters(in: .whitespaces)), number > 0 else {
                throw ApusError(.badRequest, "X-Apus-Version must be a version number (got \(text.prefix(32)))")
            }
            pinned = number
        }
        var metadata: [(name: String, value: String)] = []
        metadata.reserveCapacity(request.headers.count + 8)
        var forwardedFor: String?
        for field in request.headers {
            let name = field.name.canonicalName
            if InstanceForwarder.hopByHop.contains(name) || name.hasPrefix("x-apus-") { continue }
            if name == "x-forwarded-for" { forwardedFor = field.value; continue }
            metadata.append((field.name.rawName, field.value))
        }
        let peer = context.remoteAddress?.ipAddress ?? "unknown"
        metadata.append(("X-Forwarded-For", forwardedFor.map { "\($0), \(peer)" } ?? peer))
        if let host { metadata.append(("X-Forwarded-Host", host)) }
        metadata.append(("X-Forwarded-Proto", "http"))
        if let prefix = route.forwardedPrefix { metadata.append(("X-Forwarded-Prefix", prefix)) }
        return Invocation(
            requestID: requestID, function: route.function, pinnedVersion: pinned,
            method: request.method.rawValue, path: route.instancePath, metadata: metadata)
    }

    private func serve(_ request: Request, context: Context, requestID: String) async throws(ApusError) -> Response {
        var invocation = try decode(request, context: context, requestID: requestID)
        let version = try scheduler.catalog.route(function: invocation.function, pinnedVersion: invocation.pinnedVersion)
        let deadline = ContinuousClock.now.advanced(by: version.manifest.timeout)
        invocation.deadline = deadline

        var request = request
        let body: ByteBuffer
        do {
            body = try await request.collectBody(upTo: configuration.maxRequestBytes)
        } catch {
            throw ApusError(.tooLarge, "request body exceeds \(configuration.maxRequestBytes) bytes")
        }

        let pool = scheduler.pool(for: version)
        let lease = try await pool.acquire(requestID: requestID, deadline: deadline)
        defer { pool.release(lease) }

        invocation.metadata.append(("X-Apus-Request-Id", requestID))
        invocation.metadata.append(("X-Apus-Function", version.function))
        invocation.metadata.append(("X-Apus-Version", String(version.number)))
        let deadlineEpochMs = Int64(Date().timeIntervalSince1970 * 1000) + ContinuousClock.now.duration(to: deadline).milliseconds
        invocation.metadata.append(("X-Apus-Deadline-Ms", String(deadlineEpochMs)))

        let answer: InstanceForwarder.Answer
        do {
            answer = try await forwarder.forward(invocation, body: body, port: lease.port)
        } catch {
            logger.warning("instance call failed", metadata: [
                "requestID": "\(requestID)", "function": "\(version.function)", "version": "\(version.number)",
                "instance": "\(lease.instanceID)", "code": "\(error.code)", "reason": "\(error.message)",
            ])
            return Self.errorResponse(error, requestID: requestID, version: version.number)
        }

        var responseHeaders = HTTPFields()
        for (name, value) in answer.headers {
            guard let fieldName = HTTPField.Name(name), !InstanceForwarder.hopByHop.contains(fieldName.canonicalName) else { continue }
            responseHeaders.append(HTTPField(name: fieldName, value: value))
        }
        responseHeaders[HTTPField.Name("X-Apus-Version")!] = String(version.number)
        responseHeaders[HTTPField.Name("X-Apus-Request-Id")!] = requestID
        logger.debug("request served", metadata: [
            "requestID": "\(requestID)", "function": "\(version.function)", "version": "\(version.number)",
            "instance": "\(lease.instanceID)", "status": "\(answer.status)",
        ])
        return Response(status: .init(code: answer.status), headers: responseHeaders, body: .init(byteBuffer: answer.body))
    }
}

/// Builds the gateway listener as a service.
public enum Gateway {
    public static func makeApplication(
        host: String, port: Int, configuration: GatewayResponder.Configuration, scheduler: Scheduler,
        logger: Logger, onRunning: @escaping @Sendable (Int) async -> Void
    ) -> some ApplicationProtocol {
        let forwarder = InstanceForwarder(maxResponseBytes: configuration.maxResponseBytes)
        let responder = GatewayResponder(configuration: configuration, scheduler: scheduler, forwarder: forwarder, logger: logger)
        return Application(
            responder: responder,
            configuration: .init(address: .hostname(host, port: port), serverName: "apus-gateway"),
            services: [ForwarderService(forwarder: forwarder)],
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) },
            logger: logger)
    }
}

import ServiceLifecycle

/// Closes the upstream connection pool when the gateway stops.
struct ForwarderService: Service {
    let forwarder: InstanceForwarder

    func run() async throws {
        try? await gracefulShutdown()
        await forwarder.shutdown()
    }
}
