import Foundation

/// One address a mesh service answers on: a function's gateway listener, a sidecar's inbound port, or any service
/// that registered itself.
public struct ServiceEndpoint: Codable, Hashable, Sendable {
    /// Unique within its service (an instance id, `host:port`, …); registering the same id again replaces it.
    public var id: String
    public var address: String
    public var port: Int
    /// `http`, `grpc` or `thrift`: how callers speak to it.
    public var `protocol`: String
    /// Relative share of traffic (default 100).
    public var weight: Int
    public var zone: String?
    public var metadata: [String: String]
    /// False while the endpoint reports itself unhealthy (it stays registered but receives no traffic).
    public var healthy: Bool

    public init(id: String, address: String, port: Int, protocol: String, weight: Int = 100, zone: String? = nil,
                metadata: [String: String] = [:], healthy: Bool = true) {
        self.id = id
        self.address = address
        self.port = port
        self.protocol = `protocol`
        self.weight = weight
        self.zone = zone
        self.metadata = metadata
        self.healthy = healthy
    }
}

/// A registered service and its endpoints.
public struct ServiceRecord: Codable, Hashable, Sendable {
    public var name: String
    public var endpoints: [ServiceEndpoint]

    public init(name: String, endpoints: [ServiceEndpoint]) {
        self.name = name
        self.endpoints = endpoints
    }
}

/// What a registrant holds after registering: renew it (heartbeat) within its TTL or the entry expires.
public struct RegistrationLease: Codable, Hashable, Sendable {
    public var service: String
    public var endpointID: String
    /// The backend's lease handle (etcd lease id; the embedded registry's own id).
    public var leaseID: String
    public var ttlSeconds: Int

    public init(service: String, endpointID: String, leaseID: String, ttlSeconds: Int) {
        self.service = service
        self.endpointID = endpointID
        self.leaseID = leaseID
        self.ttlSeconds = ttlSeconds
    }
}

/// The service registry, behind one protocol with two implementations: the embedded registry inside `apusd`
/// (reached over its API by sidecars and clients; the default) and etcd (v3) for many machines.
///
/// Entries live under a TTL: a registrant heartbeats within `ttlSeconds` or its endpoint disappears; a clean stop
/// deregisters at once. `watch` delivers the service's full endpoint list after every change (and once at start).
public protocol ServiceRegistry: Sendable {
    func register(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int) async throws -> RegistrationLease
    /// Renews the lease; throws `RegistryError.leaseNotFound` when it already expired (register again).
    func heartbeat(_ lease: RegistrationLease) async throws
    /// Marks the endpoint healthy or not without removing it.
    func setHealth(_ lease: RegistrationLease, healthy: Bool) async throws
    func deregister(_ lease: RegistrationLease) async throws
    /// The service's endpoints (healthy and not); empty when nothing is registered under the name.
    func resolve(_ service: String) async throws -> [ServiceEndpoint]
    func services() async throws -> [ServiceRecord]
    /// The endpoint list now and after every change, until the consumer stops iterating.
    func watch(_ service: String) -> AsyncThrowingStream<[ServiceEndpoint], any Error>
}

public enum RegistryError: Error, Equatable, CustomStringConvertible {
    case leaseNotFound(String)
    case invalid(String)
    case unavailable(String)

    public var description: String {
        switch self {
        case .leaseNotFound(let lease): "lease \(lease) not found (expired or deregistered)"
        case .invalid(let reason): reason
        case .unavailable(let reason): "registry unavailable: \(reason)"
        }
    }
}
