import Foundation

/// An endpoint as the registry holds it: the endpoint plus its lease (when the backend tells) and the time left
/// before it expires without a heartbeat. JSON: the endpoint's fields flattened, plus `leaseID`, `ttlSeconds`,
/// `expiresInSeconds`.
public struct RegisteredEndpoint: Codable, Hashable, Sendable {
    public var endpoint: ServiceEndpoint
    public var leaseID: String?
    public var ttlSeconds: Int?
    /// Seconds until the entry expires unless renewed (nil when the backend does not say).
    public var expiresInSeconds: Double?

    public init(endpoint: ServiceEndpoint, leaseID: String? = nil, ttlSeconds: Int? = nil, expiresInSeconds: Double? = nil) {
        self.endpoint = endpoint
        self.leaseID = leaseID
        self.ttlSeconds = ttlSeconds
        self.expiresInSeconds = expiresInSeconds
    }

    enum ExtraKeys: String, CodingKey { case leaseID, ttlSeconds, expiresInSeconds }

    public init(from decoder: any Decoder) throws {
        endpoint = try ServiceEndpoint(from: decoder)
        let c = try decoder.container(keyedBy: ExtraKeys.self)
        leaseID = try c.decodeIfPresent(String.self, forKey: .leaseID)
        ttlSeconds = try c.decodeIfPresent(Int.self, forKey: .ttlSeconds)
        expiresInSeconds = try c.decodeIfPresent(Double.self, forKey: .expiresInSeconds)
    }

    enum AllKeys: String, CodingKey {
        case id, address, port, `protocol`, weight, zone, metadata, healthy, leaseID, ttlSeconds, expiresInSeconds
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: AllKeys.self)
        try c.encode(endpoint.id, forKey: .id)
        try c.encode(endpoint.address, forKey: .address)
        try c.encode(endpoint.port, forKey: .port)
        try c.encode(endpoint.protocol, forKey: .protocol)
        try c.encode(endpoint.weight, forKey: .weight)
        try c.encodeIfPresent(endpoint.zone, forKey: .zone)
        try c.encode(endpoint.metadata, forKey: .metadata)
        try c.encode(endpoint.healthy, forKey: .healthy)
        try c.encodeIfPresent(leaseID, forKey: .leaseID)
        try c.encodeIfPresent(ttlSeconds, forKey: .ttlSeconds)
        try c.encodeIfPresent(expiresInSeconds, forKey: .expiresInSeconds)
    }
}

/// One service's endpoints at one moment, with the index of its last change. Long-polling watchers pass the index
/// back (`?watch=true&index=N`) and are answered once the service's index differs from it.
public struct ServiceSnapshot: Codable, Hashable, Sendable {
    public var name: String
    /// Moves on every change to the service (registration, expiry, deregistration, health); 0 for a service that
    /// has never had an endpoint.
    public var index: UInt64
    /// Sorted by endpoint id.
    public var endpoints: [RegisteredEndpoint]

    public init(name: String, index: UInt64, endpoints: [RegisteredEndpoint]) {
        self.name = name
        self.index = index
        self.endpoints = endpoints
    }

    public var record: ServiceRecord { ServiceRecord(name: name, endpoints: endpoints.map(\.endpoint)) }
}

/// A registry that can also report leases, expiry times and change indexes: what the control API serves
/// (`GET /v1/registry/services…`, long-poll watches) and `apus services` shows.
public protocol SnapshottingServiceRegistry: ServiceRegistry {
    func snapshot(_ service: String) async throws -> ServiceSnapshot
    /// Every service with at least one endpoint, sorted by name.
    func snapshots() async throws -> [ServiceSnapshot]
    /// The service's snapshot now and after every change, until the consumer stops iterating.
    func snapshotChanges(_ service: String) -> AsyncThrowingStream<ServiceSnapshot, any Error>
}

extension SnapshottingServiceRegistry {
    /// Long-poll: the service's snapshot as soon as its index differs from `index` (a registry that restarted
    /// since counts as a change), or its current snapshot once `timeout` passes.
    public func waitForChange(_ service: String, from index: UInt64, timeout: Duration) async throws -> ServiceSnapshot {
        let changes = snapshotChanges(service)
        return try await withThrowingTaskGroup(of: ServiceSnapshot?.self) { group in
            group.addTask {
                for try await snapshot in changes where snapshot.index != index {
                    return snapshot
                }
                return nil
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            let first = try await group.next() ?? nil
            group.cancelAll()
            if let first { return first }
            return try await snapshot(service)
        }
    }
}
