/// The embedded registry's state, as a pure state machine: every operation takes the current time, nothing here
/// reads a clock, sleeps or locks, so tests drive it with a manual clock.
///
/// Each endpoint lives under a lease with a TTL; `heartbeat` pushes its expiry to `now + ttl`, `expire(now:)` removes
/// what passed it. Registering an id that exists replaces the entry and its lease (the old lease is gone). Every
/// change (register, health flip, deregister, expiry) moves the service's index to a new value of one counter,
/// which starts at `initialIndex` (apusd passes the wall-clock milliseconds, so indexes keep growing across
/// restarts and a watcher's stale index never matches a new one).
public struct RegistryStateMachine: Sendable {
    public typealias Instant = ContinuousClock.Instant

    public struct Entry: Sendable, Hashable {
        public var endpoint: ServiceEndpoint
        public var leaseID: String
        public var ttlSeconds: Int
        public var expiresAt: Instant
    }

    /// What an operation changed, for watchers and metrics.
    public enum Change: Sendable, Hashable {
        case registered(service: String, endpointID: String, replaced: Bool)
        case healthChanged(service: String, endpointID: String, healthy: Bool)
        case deregistered(service: String, endpointID: String)
        case expired(service: String, endpointID: String)

        public var service: String {
            switch self {
            case .registered(let s, _, _), .healthChanged(let s, _, _), .deregistered(let s, _), .expired(let s, _): s
            }
        }
    }

    private struct LeaseRef: Sendable {
        var service: String
        var endpointID: String
    }

    private var services: [String: [String: Entry]] = [:]
    private var leases: [String: LeaseRef] = [:]
    /// Last change index per service; kept after the service's last endpoint goes.
    private var indexes: [String: UInt64] = [:]
    private var counter: UInt64
    private var nextLease: UInt64 = 1
    private let leasePrefix: String

    public init(initialIndex: UInt64 = 0, leasePrefix: String) {
        self.counter = initialIndex
        self.leasePrefix = leasePrefix
    }

    private mutating func bump(_ service: String) {
        counter += 1
        indexes[service] = counter
    }

    public mutating func register(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int, now: Instant)
        throws(RegistryError) -> (RegistrationLease, Change)
    {
        try RegistryValidation.validate(service: service, endpoint: endpoint, ttlSeconds: ttlSeconds)
        let replaced = services[service]?[endpoint.id]
        if let replaced { leases[replaced.leaseID] = nil }
        let leaseID = "\(leasePrefix)-\(nextLease)"
        nextLease += 1
        leases[leaseID] = LeaseRef(service: service, endpointID: endpoint.id)
        services[service, default: [:]][endpoint.id] = Entry(
            endpoint: endpoint, leaseID: leaseID, ttlSeconds: ttlSeconds, expiresAt: now.advanced(by: .seconds(ttlSeconds)))
        bump(service)
        return (RegistrationLease(service: service, endpointID: endpoint.id, leaseID: leaseID, ttlSeconds: ttlSeconds),
                .registered(service: service, endpointID: endpoint.id, replaced: replaced != nil))
    }

    private func entry(lease leaseID: String) throws(RegistryError) -> (LeaseRef, Entry) {
        guard let ref = leases[leaseID], let entry = services[ref.service]?[ref.endpointID] else {
            throw .leaseNotFound(leaseID)
        }
        return (ref, entry)
    }

    /// Renews the lease for another TTL from `now`. An expired lease is gone even if `expire` has not run yet.
    public mutating func heartbeat(leaseID: String, now: Instant) throws(RegistryError) -> RegistrationLease {
        let (ref, entry) = try entry(lease: leaseID)
        guard entry.expiresAt > now else { throw .leaseNotFound(leaseID) }
        services[ref.service]![ref.endpointID]!.expiresAt = now.advanced(by: .seconds(entry.ttlSeconds))
        return RegistrationLease(service: ref.service, endpointID: ref.endpointID, leaseID: leaseID, ttlSeconds: entry.ttlSeconds)
    }

    /// Flips the health flag; nil when it already had that value (no change, no index move).
    public mutating func setHealth(leaseID: String, healthy: Bool, now: Instant) throws(RegistryError) -> Change? {
        let (ref, entry) = try entry(lease: leaseID)
        guard entry.expiresAt > now else { throw .leaseNotFound(leaseID) }
        guard entry.endpoint.healthy != healthy else { return nil }
        services[ref.service]![ref.endpointID]!.endpoint.healthy = healthy
        bump(ref.service)
        return .healthChanged(service: ref.service, endpointID: ref.endpointID, healthy: healthy)
    }

    public mutating func deregister(leaseID: String) throws(RegistryError) -> Change {
        let (ref, _) = try entry(lease: leaseID)
        remove(service: ref.service, endpointID: ref.endpointID)
        return .deregistered(service: ref.service, endpointID: ref.endpointID)
    }

    /// Removes the endpoint whoever registered it; `leaseID`, when given, must be its current lease.
    public mutating func deregister(service: String, endpointID: String, leaseID: String?) throws(RegistryError) -> Change {
        guard let entry = services[service]?[endpointID] else {
            throw .leaseNotFound(leaseID ?? "of \(service)/\(endpointID)")
        }
        if let leaseID, leaseID != entry.leaseID { throw .leaseNotFound(leaseID) }
        remove(service: service, endpointID: endpointID)
        return .deregistered(service: service, endpointID: endpointID)
    }

    private mutating func remove(service: String, endpointID: String) {
        guard let entry = services[service]?.removeValue(forKey: endpointID) else { return }
        leases[entry.leaseID] = nil
        if services[service]?.isEmpty == true { services[service] = nil }
        bump(service)
    }

    /// Removes every entry whose lease passed its expiry; returns what went.
    public mutating func expire(now: Instant) -> [Change] {
        var gone: [Change] = []
        for (service, entries) in services {
            for (id, entry) in entries where entry.expiresAt <= now {
                gone.append(.expired(service: service, endpointID: id))
            }
        }
        for change in gone {
            if case .expired(let service, let id) = change { remove(service: service, endpointID: id) }
        }
        return gone.sorted { "\($0)" < "\($1)" }
    }

    /// When the next lease runs out (nil: nothing registered).
    public var nextExpiry: Instant? {
        services.values.lazy.flatMap(\.values).map(\.expiresAt).min()
    }

    public func index(of service: String) -> UInt64 { indexes[service] ?? 0 }

    public func endpoints(of service: String) -> [ServiceEndpoint] {
        (services[service] ?? [:]).values.map(\.endpoint).sorted { $0.id < $1.id }
    }

    public func snapshot(of service: String, now: Instant) -> ServiceSnapshot {
        let entries = (services[service] ?? [:]).values.sorted { $0.endpoint.id < $1.endpoint.id }
        return ServiceSnapshot(name: service, index: index(of: service), endpoints: entries.map { entry in
            let left = entry.expiresAt - now
            let seconds = max(0, Double(left.components.seconds) + Double(left.components.attoseconds) / 1e18)
            return RegisteredEndpoint(endpoint: entry.endpoint, leaseID: entry.leaseID, ttlSeconds: entry.ttlSeconds,
                                      expiresInSeconds: (seconds * 1000).rounded() / 1000)
        })
    }

    /// Services with at least one endpoint, sorted by name.
    public var serviceNames: [String] { services.keys.sorted() }

    public func endpointCount(of service: String) -> Int { services[service]?.count ?? 0 }
}
