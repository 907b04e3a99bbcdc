import ApusMesh
import Foundation
import Synchronization

/// A registry whose services come from the sidecar's YAML file (`--registry static`): for running standalone
/// and for tests. Registrations made against it live in memory with their TTL like in the real registries;
/// `replace(services:)` (a SIGHUP reload) notifies the watchers.
public final class StaticRegistry: ServiceRegistry {
    private struct Entry {
        var endpoint: ServiceEndpoint
        var leaseID: String?
        var expires: ContinuousClock.Instant?
    }

    private struct State {
        var services: [String: [String: Entry]] = [:]
        var order: [String: [String]] = [:]
        var watchers: [String: [UUID: AsyncThrowingStream<[ServiceEndpoint], any Error>.Continuation]] = [:]
        var nextLease = 1
    }

    private let state = Mutex(State())

    public init(services: [String: [ServiceEndpoint]] = [:]) {
        replace(services: services)
    }

    /// The static upstreams of a config file.
    public convenience init(config: SidecarConfig) {
        self.init(services: Self.staticServices(config))
    }

    public static func staticServices(_ config: SidecarConfig) -> [String: [ServiceEndpoint]] {
        config.upstreams.compactMapValues { $0.endpoints }
    }

    /// Replaces the file-defined endpoints (registrations made at run time stay) and notifies watchers.
    public func replace(services: [String: [ServiceEndpoint]]) {
        let notify = state.withLock { state -> [(AsyncThrowingStream<[ServiceEndpoint], any Error>.Continuation, [ServiceEndpoint])] in
            var touched = Set(state.services.keys)
            for (name, entries) in state.services {
                let kept = entries.filter { $0.value.leaseID != nil }
                state.services[name] = kept
                state.order[name] = state.order[name]?.filter { kept[$0] != nil }
            }
            for (name, endpoints) in services {
                touched.insert(name)
                for endpoint in endpoints {
                    if state.services[name]?[endpoint.id] == nil { state.order[name, default: []].append(endpoint.id) }
                    state.services[name, default: [:]][endpoint.id] = Entry(endpoint: endpoint)
                }
            }
            return touched.flatMap { name in
                let list = Self.list(state, name)
                return (state.watchers[name] ?? [:]).values.map { ($0, list) }
            }
        }
        for (continuation, list) in notify { continuation.yield(list) }
    }

    private static func list(_ state: State, _ name: String) -> [ServiceEndpoint] {
        let now = ContinuousClock.now
        return (state.order[name] ?? []).compactMap { id in
            guard let entry = state.services[name]?[id] else { return nil }
            if let expires = entry.expires, expires < now { return nil }
            return entry.endpoint
        }
    }

    private func changed(_ name: String, in state: State) -> [(AsyncThrowingStream<[ServiceEndpoint], any Error>.Continuation, [ServiceEndpoint])] {
        let list = Self.list(state, name)
        return (state.watchers[name] ?? [:]).values.map { ($0, list) }
    }

    public func register(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int) async throws -> RegistrationLease {
        guard !service.isEmpty, ttlSeconds >= 1 else { throw RegistryError.invalid("service name and a TTL of at least 1 s are required") }
        let (lease, notify) = state.withLock { state in
            let leaseID = "static-\(state.nextLease)"
            state.nextLease += 1
            if state.services[service]?[endpoint.id] == nil { state.order[service, default: []].append(endpoint.id) }
            state.services[service, default: [:]][endpoint.id] = Entry(
                endpoint: endpoint, leaseID: leaseID, expires: .now + .seconds(ttlSeconds))
            return (RegistrationLease(service: service, endpointID: endpoint.id, leaseID: leaseID, ttlSeconds: ttlSeconds),
                    changed(service, in: state))
        }
        for (continuation, list) in notify { continuation.yield(list) }
        return lease
    }

    private func withLease<T>(_ lease: RegistrationLease, _ body: (inout Entry) -> T) throws -> T {
        try state.withLock { state in
            guard var entry = state.services[lease.service]?[lease.endpointID], entry.leaseID == lease.leaseID,
                  (entry.expires.map { $0 >= .now } ?? true) else {
                throw RegistryError.leaseNotFound(lease.leaseID)
            }
            let result = body(&entry)
            state.services[lease.service]![lease.endpointID] = entry
            return result
        }
    }

    public func heartbeat(_ lease: RegistrationLease) async throws {
        try withLease(lease) { $0.expires = .now + .seconds(lease.ttlSeconds) }
    }

    public func setHealth(_ lease: RegistrationLease, healthy: Bool) async throws {
        let changed = try withLease(lease) { entry -> Bool in
            defer { entry.endpoint.healthy = healthy }
            return entry.endpoint.healthy != healthy
        }
        if changed {
            let notify = state.withLock { self.changed(lease.service, in: $0) }
            for (continuation, list) in notify { continuation.yield(list) }
        }
    }

    public func deregister(_ lease: RegistrationLease) async throws {
        let notify = try state.withLock { state in
            guard let entry = state.services[lease.service]?[lease.endpointID], entry.leaseID == lease.leaseID else {
                throw RegistryError.leaseNotFound(lease.leaseID)
            }
            state.services[lease.service]![lease.endpointID] = nil
            state.order[lease.service]?.removeAll { $0 == lease.endpointID }
            return changed(lease.service, in: state)
        }
        for (continuation, list) in notify { continuation.yield(list) }
    }

    public func resolve(_ service: String) async throws -> [ServiceEndpoint] {
        state.withLock { Self.list($0, service) }
    }

    public func services() async throws -> [ServiceRecord] {
        state.withLock { state in
            state.order.keys.sorted().map { ServiceRecord(name: $0, endpoints: Self.list(state, $0)) }.filter { !$0.endpoints.isEmpty }
        }
    }

    public func watch(_ service: String) -> AsyncThrowingStream<[ServiceEndpoint], any Error> {
        let (stream, continuation) = AsyncThrowingStream<[ServiceEndpoint], any Error>.makeStream()
        let id = UUID()
        // Set before the continuation is shared; the handler takes the lock, so the continuation it removes is
        // released after the lock (never finish or drop a continuation while holding it).
        continuation.onTermination = { [weak self] _ in
            let removed = self?.state.withLock { $0.watchers[service]?.removeValue(forKey: id) }
            _ = removed
        }
        let current = state.withLock { state in
            state.watchers[service, default: [:]][id] = continuation
            return Self.list(state, service)
        }
        continuation.yield(current)
        return stream
    }
}

/// Picks the registry for `--registry URL`: `static` is the file-defined `StaticRegistry`; any other URL goes
/// to `factory` (the executable passes ApusMesh's `makeServiceRegistry(url:logger:)`).
public func registryFor(
    url: String, config: SidecarConfig,
    factory: (String) throws -> any ServiceRegistry
) throws -> any ServiceRegistry {
    if url == "static" { return StaticRegistry(config: config) }
    return try factory(url)
}
