import ApusCore
import ApusRuntime
import ApusScheduler
import ApusTasks
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import ApusTelemetry
import Synchronization

/// The REST/JSON control API (see IDL/apus-api.openapi.yaml).
public struct ControlAPI: Sendable {
    public struct Info: Codable, Sendable {
        public struct Gateway: Codable, Sendable {
            public var http: String?

            public init(http: String?) { self.http = http }
        }

        public var version: String
        public var gateway: Gateway
        public var domain: String
        public var sandbox: String
        /// Which isolation layers instances get on this node.
        public var sandboxLayers: SandboxLayers?

        public init(version: String, gateway: Gateway, domain: String, sandbox: String, sandboxLayers: SandboxLayers? = nil) {
            self.version = version
            self.gateway = gateway
            self.domain = domain
            self.sandbox = sandbox
            self.sandboxLayers = sandboxLayers
        }
    }

    struct FunctionDetail: Codable {
        var name: String
        var latestVersion: Int
        var release: Release
        var createdAt: Date
        var updatedAt: Date
        var versions: [FunctionVersion]
    }

    struct ReleaseRequest: Codable {
        var weights: [Release.Weight]
    }

    public let control: ControlPlane
    public let info: @Sendable () -> Info
    /// Set once shutdown begins so open `logs?follow=true` streams end and the API can drain.
    public let stopping: ShutdownFlag
    /// The asynchronous task manager; its routes are served when set.
    public var tasks: TaskManager?
    /// Where the daemon's swift-metrics land; served as Prometheus text on `GET /metrics` (none: 404).
    public let metrics: PrometheusExport?
    /// Checks every call's bearer token against the route's scope (`ControlGate`); nil serves the API without
    /// authentication (unit tests of single routes).
    public var authority: TokenAuthority?
    /// Scopes per route and the cross-site checks of mutating calls.
    public var policy = APIPolicy()
    private let logger: Logger

    public init(
        control: ControlPlane, info: @escaping @Sendable () -> Info, stopping: ShutdownFlag,
        metrics: PrometheusExport? = nil, logger: Logger
    ) {
        self.control = control
        self.info = info
        self.stopping = stopping
        self.metrics = metrics
        self.logger = logger
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }()

    static func json<T: Encodable>(_ value: T, status: HTTPResponse.Status = .ok) throws -> Response {
        var data = try encoder.encode(value)
        data.append(UInt8(ascii: "\n"))
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    static func errorResponse(_ error: ApusError) -> Response {
        Response(
            status: .init(code: error.code.httpStatus), headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: error.jsonBody + "\n")))
    }

    /// A function's instance bounds: the `apus scale` override and what each released version ends up with.
    struct ScaleStatus: Codable {
        struct VersionBounds: Codable {
            var version: Int
            var min: Int
            var max: Int
        }

        var function: String
        var override: ScaleOverride?
        var versions: [VersionBounds]

        private enum CodingKeys: String, CodingKey { case function, override, versions }

        /// `override` is null rather than absent when the manifests decide.
        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(function, forKey: .function)
            try container.encode(override, forKey: .override)
            try container.encode(versions, forKey: .versions)
        }
    }

    func scaleStatus(_ record: FunctionRecord) -> ScaleStatus {
        let entry = control.catalog.entry(record.name)
        let versions = record.release.activeVersions.sorted().compactMap { number in
            entry?.versions[number].map { version in
                let bounds = control.scheduler.scaleBounds(of: version)
                return ScaleStatus.VersionBounds(version: number, min: bounds.min, max: bounds.max)
            }
        }
        return ScaleStatus(function: record.name, override: record.scale, versions: versions)
    }

    /// `{"min": N, "max": M}`, either may be left out; anything else is refused with what was wrong.
    static func parseScale(_ body: Data) throws(ApusError) -> ScaleOverride {
        guard let object = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] else {
            throw ApusError(.badRequest, "scale body must be a JSON object such as {\"min\": 1, \"max\": 10}")
        }
        if let unknown = object.keys.sorted().first(where: { $0 != "min" && $0 != "max" }) {
            throw ApusError(.badRequest, "scale.\(unknown): unknown key (allowed: min, max)")
        }
        struct Bounds: Decodable { var min: Int?; var max: Int? }
        for key in ["min", "max"] {
            struct One: Decodable { var value: Int? }
            guard let value = object[key] else { continue }
            let wrapped = (try? JSONSerialization.data(withJSONObject: ["value": value])) ?? Data()
            guard (try? JSONDecoder().decode(One.self, from: wrapped)) != nil else {
                throw ApusError(.badRequest, "scale.\(key): must be a whole number or null (got \(value))")
            }
        }
        do {
            let bounds = try JSONDecoder().decode(Bounds.self, from: body)
            return ScaleOverride(min: bounds.min, max: bounds.max)
        } catch {
            throw ApusError(.badRequest, "scale body: \(error)")
        }
    }

    /// What a caller without `admin` sees of an `env` value: the manifest's environment may hold secrets.
    static let redactedValue = "(redacted)"

    /// The versions as `context`'s caller may see them: `env` values only for admin (or with authentication off),
    /// the keys alone for everyone else.
    static func visible(_ versions: [FunctionVersion], to context: ControlRequestContext) -> [FunctionVersion] {
        guard !context.isAdmin else { return versions }
        return versions.map { version in
            var version = version
            version.manifest.env = version.manifest.env.mapValues { _ in redactedValue }
            return version
        }
    }

    func name(_ context: ControlRequestContext) throws(ApusError) -> String {
        guard let name = context.parameters.get("name") else { throw ApusError(.badRequest, "missing function name") }
        return name
    }

    public func makeRouter() -> Router<ControlRequestContext> {
        let router = Router(context: ControlRequestContext.self)
        if let authority {
            router.add(middleware: ControlGate(authority: authority, policy: policy, audit: Logger(label: "apus.audit")))
        }
        router.add(middleware: ErrorMiddleware())
        let control = self.control

        // Liveness, for load balancers and supervisors: open, says nothing about the platform.
        router.get("/healthz") { _, _ in try Self.json(["status": "ok"]) }

        router.get("/v1/info") { _, _ in try Self.json(info()) }

        if let export = metrics {
            // Prometheus text exposition format 0.0.4; gauges are brought up to date first.
            router.get("/metrics") { _, _ in
                control.scheduler.refreshMetrics()
                return Response(
                    status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                    body: .init(byteBuffer: ByteBuffer(bytes: export.render())))
            }
        }

        router.post("/v1/functions") { request, _ in
            var request = request
            let body: ByteBuffer
            do {
                body = try await request.collectBody(upTo: ControlPlane.maxArchiveBytes)
            } catch {
                throw ApusError(.tooLarge, "code archive exceeds \(ControlPlane.maxArchiveBytes) bytes")
            }
            let release = request.uri.queryParameters["release"].map { $0 != "false" && $0 != "0" } ?? true
            let result = try control.deploy(archive: Data(buffer: body), release: release)
            return try Self.json(result, status: .created)
        }

        router.get("/v1/functions") { _, _ in
            struct Listing: Codable { var functions: [FunctionRecord] }
            return try Self.json(Listing(functions: try control.store.functions()))
        }

        router.get("/v1/functions/:name") { _, context in
            let record = try control.requireFunction(try name(context))
            let versions = Self.visible(try control.store.versions(of: record.name), to: context)
            return try Self.json(FunctionDetail(
                name: record.name, latestVersion: record.latestVersion, release: record.release,
                createdAt: record.createdAt, updatedAt: record.updatedAt, versions: versions))
        }

        router.delete("/v1/functions/:name") { _, context in
            try await control.delete(function: try name(context))
            return Response(status: .noContent)
        }

        router.get("/v1/functions/:name/versions") { _, context in
            struct Listing: Codable { var versions: [FunctionVersion] }
            return try Self.json(Listing(versions: Self.visible(try control.store.versions(of: try name(context)), to: context)))
        }

        router.get("/v1/functions/:name/versions/:number") { _, context in
            let function = try name(context)
            guard let text = context.parameters.get("number"), let number = Int(text) else {
                throw ApusError(.badRequest, "version must be a number")
            }
            _ = try control.requireFunction(function)
            guard let version = try control.store.version(number, of: function) else {
                throw ApusError(.notFound, "function \(function) has no version \(number)")
            }
            return try Self.json(Self.visible([version], to: context)[0])
        }

        router.put("/v1/functions/:name/release") { request, context in
            let function = try name(context)
            var request = request
            let body = try await request.collectBody(upTo: 1 << 20)
            let parsed: ReleaseRequest
            do {
                parsed = try JSONDecoder().decode(ReleaseRequest.self, from: Data(buffer: body))
            } catch {
                throw ApusError(.badRequest, "release body must be {\"weights\":[{\"version\":N,\"weight\":W},…]}: \(error)")
            }
            return try Self.json(try control.setRelease(function: function, weights: parsed.weights))
        }

        router.get("/v1/functions/:name/instances") { _, context in
            struct Listing: Codable {
                var function: String
                var queueDepth: Int
                var instances: [InstancePool.InstanceInfo]
                /// The autoscaler's latest decision per version.
                var autoscaler: [Scheduler.ScalerStatus]
                var scale: ScaleStatus
            }
            let function = try name(context)
            let record = try control.requireFunction(function)
            return try Self.json(Listing(
                function: function, queueDepth: control.scheduler.queueDepth(of: function),
                instances: control.scheduler.instances(of: function),
                autoscaler: control.scheduler.scalerStatus(of: function),
                scale: scaleStatus(record)))
        }

        router.put("/v1/functions/:name/scale") { request, context in
            let function = try name(context)
            var request = request
            let body = try await request.collectBody(upTo: 64 << 10)
            let record = try control.setScale(function: function, scale: try Self.parseScale(Data(buffer: body)))
            return try Self.json(scaleStatus(record))
        }

        router.delete("/v1/functions/:name/scale") { _, context in
            try Self.json(scaleStatus(try control.setScale(function: try name(context), scale: nil)))
        }

        router.get("/v1/functions/:name/logs") { request, context in
            let function = try name(context)
            _ = try control.requireFunction(function)
            var tail = 100
            if let text = request.uri.queryParameters["tail"] {
                guard let value = Int(text), (0...100_000).contains(value) else {
                    throw ApusError(.badRequest, "tail must be 0-100000 (got \"\(text.prefix(20))\")")
                }
                tail = value
            }
            let follow = request.uri.queryParameters["follow"].map { $0 == "true" || $0 == "1" } ?? false
            let headers: HTTPFields = [.contentType: "text/plain; charset=utf-8"]
            let logs = control.logs
            if !follow {
                let lines = logs.tail(function: function, count: tail)
                let text = lines.isEmpty ? "" : lines.joined(separator: "\n") + "\n"
                return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
            }
            let stopping = self.stopping
            let live = logs.follow(function: function, isActive: { !stopping.isSet })
            let earlier = logs.tail(function: function, count: tail)
            return Response(status: .ok, headers: headers, body: ResponseBody { writer in
                if !earlier.isEmpty {
                    try await writer.write(ByteBuffer(string: earlier.joined(separator: "\n") + "\n"))
                }
                for await line in live {
                    try await writer.write(ByteBuffer(string: line + "\n"))
                }
                try await writer.finish(nil)
            })
        }
        if let tasks { addTaskRoutes(to: router, tasks: tasks) }
        if let authority { addTokenRoutes(to: router, authority: authority) }
        if let secrets = control.secrets { addSecretRoutes(to: router, secrets: secrets) }
        return router
    }
}

/// Turns every error into the JSON error envelope.
struct ErrorMiddleware: RouterMiddleware {
    typealias Context = ControlRequestContext

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as ApusError {
            return ControlAPI.errorResponse(error)
        } catch let error as HTTPError {
            let code: ApusError.Code = error.status == .notFound ? .notFound : (error.status.code < 500 ? .badRequest : .internal)
            let message = error.status == .notFound ? "no such endpoint: \(request.method) \(request.uri.path)" : (error.body ?? "\(error.status)")
            return ControlAPI.errorResponse(ApusError(code, message))
        } catch {
            context.logger.error("control API failure", metadata: ["error": "\(error)"])
            return ControlAPI.errorResponse(ApusError(.internal, "\(error)"))
        }
    }
}

/// A one-way flag raised when shutdown begins.
public final class ShutdownFlag: Sendable {
    private let value = Atomic<Bool>(false)

    public init() {}

    public var isSet: Bool { value.load(ordering: .acquiring) }

    public func set() { value.store(true, ordering: .releasing) }
}
