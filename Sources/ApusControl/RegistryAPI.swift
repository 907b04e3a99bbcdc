import ApusCore
import ApusMesh
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import Synchronization

/// The service registry on the control API (`/v1/registry/…`, see IDL/apus-api.openapi.yaml): the embedded
/// registry served to sidecars and clients (`RegistryHTTPClient` is its client), or, with `apusd --registry etcd://…`,
/// the same routes over etcd. Bad input is a 400 naming the field; an unknown lease or endpoint is a 404.
public struct RegistryAPI: Sendable {
    public let registry: any SnapshottingServiceRegistry
    /// Raised when the daemon stops: open long-polls answer at once.
    public let stopping: ShutdownFlag
    /// Longest `?wait=` a watch may ask for.
    public static let maxWait: Duration = .seconds(300)
    public static let defaultWait: Duration = .seconds(30)
    public static let defaultTTLSeconds = 10

    /// Which token registered each endpoint: only that token (or an admin) may renew, change or remove it.
    let owners = RegistryOwners()

    public init(registry: any SnapshottingServiceRegistry, stopping: ShutdownFlag) {
        self.registry = registry
        self.stopping = stopping
    }

    /// Whether `service` holds an endpoint `id` now.
    func isRegistered(_ service: String, _ id: String) async -> Bool {
        ((try? await registry.snapshot(service))?.endpoints.contains { $0.endpoint.id == id }) ?? false
    }

    /// Refuses a caller other than an admin or the token that registered `service`/`id`, when that endpoint exists.
    func requireOwner(_ context: ControlRequestContext, service: String, id: String, verb: String) async throws(ApusError) {
        guard !context.isAdmin else { return }
        let caller = context.token?.id
        if caller != nil, owners.owner(service: service, id: id) == caller { return }
        guard await isRegistered(service, id) else { return }  // the registry answers: not found
        throw ApusError(.forbidden, "token \(context.token?.name ?? "-") may not \(verb) endpoint \(id) of service \(service): it was registered by another token (only that token or an admin may)")
    }

    /// Refuses a caller other than an admin or the token that registered the lease's endpoint, when the lease exists.
    func requireLeaseOwner(_ context: ControlRequestContext, leaseID: String) async throws(ApusError) {
        guard !context.isAdmin else { return }
        if let caller = context.token?.id, owners.leaseOwner(leaseID) == caller { return }
        guard (try? await Self.findLease(leaseID, in: registry)) != nil else { return }  // the registry answers: not found
        throw ApusError(.forbidden, "token \(context.token?.name ?? "-") may not use lease \(leaseID): its endpoint was registered by another token (only that token or an admin may)")
    }

    static func apusError(_ error: any Error) -> any Error {
        switch error {
        case RegistryError.invalid(let reason): ApusError(.badRequest, reason)
        case RegistryError.leaseNotFound(let lease): ApusError(.notFound, "lease \(lease) not found (expired or deregistered)")
        case RegistryError.unavailable(let reason): ApusError(.unavailable, "registry unavailable: \(reason)")
        default: error
        }
    }

    /// Runs a registry call, turning `RegistryError`s into the API's errors.
    static func mapped<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            throw apusError(error)
        }
    }

    /// The endpoint fields of a registration body, with `ttlSeconds`; unknown keys and wrong types are refused
    /// naming the key.
    static func parseRegistration(_ data: Data, endpointID: String) throws(ApusError) -> (ServiceEndpoint, Int) {
        guard let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw ApusError(.badRequest, "registration body must be a JSON object such as {\"address\": \"10.0.0.5\", \"port\": 8080, \"protocol\": \"http\", \"ttlSeconds\": 10}")
        }
        let allowed = ["id", "address", "port", "protocol", "weight", "zone", "metadata", "healthy", "ttlSeconds"]
        if let unknown = object.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw ApusError(.badRequest, "\(unknown): unknown key (allowed: \(allowed.joined(separator: ", ")))")
        }
        struct Body: Decodable {
            var id: String?
            var address: String?
            var port: Int?
            var `protocol`: String?
            var weight: Int?
            var zone: String?
            var metadata: [String: String]?
            var healthy: Bool?
            var ttlSeconds: Int?
        }
        let body: Body
        do {
            body = try JSONDecoder().decode(Body.self, from: data)
        } catch let DecodingError.typeMismatch(type, context) {
            throw ApusError(.badRequest, "\(fieldPath(context.codingPath)): must be \(typeName(type))")
        } catch let DecodingError.dataCorrupted(context) {
            throw ApusError(.badRequest, "\(fieldPath(context.codingPath)): \(context.debugDescription)")
        } catch {
            throw ApusError(.badRequest, "registration body: \(error)")
        }
        if let id = body.id, id != endpointID {
            throw ApusError(.badRequest, "id: \(id) differs from the endpoint id in the path (\(endpointID))")
        }
        guard let address = body.address else { throw ApusError(.badRequest, "address: is required") }
        guard let port = body.port else { throw ApusError(.badRequest, "port: is required") }
        guard let wire = body.protocol else { throw ApusError(.badRequest, "protocol: is required (http, grpc or thrift)") }
        let endpoint = ServiceEndpoint(
            id: endpointID, address: address, port: port, protocol: wire, weight: body.weight ?? 100, zone: body.zone,
            metadata: body.metadata ?? [:], healthy: body.healthy ?? true)
        return (endpoint, body.ttlSeconds ?? defaultTTLSeconds)
    }

    static func fieldPath(_ path: [any CodingKey]) -> String {
        path.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
    }

    static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is Int.Type: "a whole number"
        case is Bool.Type: "true or false"
        case is String.Type: "a string"
        default: "a JSON object of strings"
        }
    }

    static func snapshotResponse(_ snapshot: ServiceSnapshot) throws -> Response {
        var response = try ControlAPI.json(snapshot)
        response.headers[HTTPField.Name("X-Apus-Registry-Index")!] = String(snapshot.index)
        return response
    }

    func parameter(_ context: ControlRequestContext, _ name: String) throws(ApusError) -> String {
        guard let value = context.parameters.get(name)?.removingPercentEncoding, !value.isEmpty else {
            throw ApusError(.badRequest, "missing \(name) in the path")
        }
        return value
    }

    /// Answers the long-poll once the service's index differs from `index`, `wait` passes, or the daemon stops.
    func longPoll(_ service: String, index: UInt64, wait: Duration) async throws -> ServiceSnapshot {
        let registry = self.registry
        let stopping = self.stopping
        return try await withThrowingTaskGroup(of: ServiceSnapshot?.self) { group in
            group.addTask { try await registry.waitForChange(service, from: index, timeout: wait) }
            group.addTask {
                while !stopping.isSet { try await Task.sleep(for: .milliseconds(200)) }
                return nil
            }
            let first = try await group.next() ?? nil
            group.cancelAll()
            if let first { return first }
            return try await registry.snapshot(service)
        }
    }

    /// Adds the `/v1/registry` routes to a router (the control API's), with the JSON error envelope.
    public func addRoutes(to router: Router<ControlRequestContext>) {
        let registry = self.registry
        let router = router.group("/v1/registry").add(middleware: ErrorMiddleware())

        router.get("services") { _, _ in
            struct Listing: Codable { var services: [ServiceSnapshot] }
            return try ControlAPI.json(Listing(services: try await Self.mapped { try await registry.snapshots() }))
        }

        router.get("services/:service") { request, context in
            let service = try parameter(context, "service")
            try Self.validate(service)
            let query = request.uri.queryParameters
            let watch = query["watch"].map { $0 == "true" || $0 == "1" } ?? false
            guard watch else {
                return try Self.snapshotResponse(try await Self.mapped { try await registry.snapshot(service) })
            }
            guard let indexText = query["index"].map(String.init), let index = UInt64(indexText) else {
                throw ApusError(.badRequest, "index: a watch needs ?index=N, the index of the snapshot the caller has (0 for none)")
            }
            var wait = Self.defaultWait
            if let text = query["wait"].map(String.init) {
                guard let parsed = Duration(humanReadable: text), parsed > .zero, parsed <= Self.maxWait else {
                    throw ApusError(.badRequest, "wait: must be a duration up to 5m such as 30s (got \(text))")
                }
                wait = parsed
            }
            return try Self.snapshotResponse(try await Self.mapped { try await longPoll(service, index: index, wait: wait) })
        }

        router.put("services/:service/endpoints/:id") { request, context in
            let service = try parameter(context, "service")
            let id = try parameter(context, "id")
            var request = request
            let body = try await request.collectBody(upTo: 256 << 10)
            let (endpoint, ttl) = try Self.parseRegistration(Data(buffer: body), endpointID: id)
            try await requireOwner(context, service: service, id: id, verb: "replace")
            let lease = try await Self.mapped { try await registry.register(service: service, endpoint: endpoint, ttlSeconds: ttl) }
            if let token = context.token { owners.record(service: service, id: id, lease: lease.leaseID, owner: token.id) }
            return try ControlAPI.json(lease)
        }

        router.delete("services/:service/endpoints/:id") { request, context in
            let service = try parameter(context, "service")
            let id = try parameter(context, "id")
            let lease = request.uri.queryParameters["lease"].map(String.init)
            try await requireOwner(context, service: service, id: id, verb: "remove")
            try await Self.mapped {
                switch registry {
                case let embedded as EmbeddedRegistry: try embedded.deregister(service: service, endpointID: id, leaseID: lease)
                case let etcd as EtcdRegistry: try await etcd.deregister(service: service, endpointID: id, leaseID: lease)
                default:
                    guard let lease else { throw ApusError(.badRequest, "lease: required by this registry") }
                    try await registry.deregister(RegistrationLease(service: service, endpointID: id, leaseID: lease, ttlSeconds: 0))
                }
            }
            owners.forget(service: service, id: id)
            return Response(status: .noContent)
        }

        router.post("leases/:lease/heartbeat") { _, context in
            let leaseID = try parameter(context, "lease")
            try await requireLeaseOwner(context, leaseID: leaseID)
            let lease = try await Self.mapped { () async throws -> RegistrationLease in
                if let embedded = registry as? EmbeddedRegistry { return try embedded.renew(leaseID: leaseID) }
                let found = try await Self.findLease(leaseID, in: registry)
                try await registry.heartbeat(found)
                return found
            }
            return try ControlAPI.json(lease)
        }

        router.put("leases/:lease/health") { request, context in
            let leaseID = try parameter(context, "lease")
            try await requireLeaseOwner(context, leaseID: leaseID)
            var request = request
            let body = try await request.collectBody(upTo: 64 << 10)
            struct Health: Decodable { var healthy: Bool }
            let data = Data(buffer: body)
            guard let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any], object.count == 1,
                  let healthy = (try? JSONDecoder().decode(Health.self, from: data))?.healthy else {
                throw ApusError(.badRequest, "healthy: the body must be {\"healthy\": true} or {\"healthy\": false}")
            }
            let lease = try await Self.mapped { () async throws -> RegistrationLease in
                if let embedded = registry as? EmbeddedRegistry {
                    try embedded.setHealth(leaseID: leaseID, healthy: healthy)
                    return try embedded.renew(leaseID: leaseID)
                }
                let found = try await Self.findLease(leaseID, in: registry)
                try await registry.setHealth(found, healthy: healthy)
                return found
            }
            return try ControlAPI.json(lease)
        }
    }

    static func validate(_ service: String) throws(ApusError) {
        do {
            try RegistryValidation.validateService(service)
        } catch {
            throw ApusError(.badRequest, error.description)
        }
    }

    /// The registration holding a lease, for registries whose calls need the service and endpoint id too.
    static func findLease(_ leaseID: String, in registry: any SnapshottingServiceRegistry) async throws -> RegistrationLease {
        if let etcd = registry as? EtcdRegistry { return try await etcd.registration(holding: leaseID) }
        for snapshot in try await registry.snapshots() {
            if let entry = snapshot.endpoints.first(where: { $0.leaseID == leaseID }) {
                return RegistrationLease(service: snapshot.name, endpointID: entry.endpoint.id, leaseID: leaseID, ttlSeconds: entry.ttlSeconds ?? 0)
            }
        }
        throw RegistryError.leaseNotFound(leaseID)
    }
}

/// The token that registered each endpoint (by token id) and the endpoint of each lease, as registered through this
/// API in this run. Endpoints registered otherwise (the mesh publisher, an earlier run) have no owner here: only an
/// admin may change them.
final class RegistryOwners: Sendable {
    private struct Key: Hashable {
        var service: String
        var id: String
    }

    private struct State {
        var owners: [Key: (owner: String, lease: String)] = [:]
        var leases: [String: Key] = [:]
    }

    private let state = Mutex(State())

    func record(service: String, id: String, lease: String, owner: String) {
        state.withLock { state in
            let key = Key(service: service, id: id)
            if let previous = state.owners[key] { state.leases[previous.lease] = nil }
            state.owners[key] = (owner, lease)
            state.leases[lease] = key
        }
    }

    func forget(service: String, id: String) {
        state.withLock { state in
            if let previous = state.owners.removeValue(forKey: Key(service: service, id: id)) { state.leases[previous.lease] = nil }
        }
    }

    func owner(service: String, id: String) -> String? {
        state.withLock { $0.owners[Key(service: service, id: id)]?.owner }
    }

    func leaseOwner(_ lease: String) -> String? {
        state.withLock { state in state.leases[lease].flatMap { state.owners[$0]?.owner } }
    }
}
