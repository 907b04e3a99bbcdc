import ApusCore
import ApusMesh
import ApusScheduler
import Logging

/// Keeps every function with `mesh.service` registered in service discovery under that name, with the gateway's
/// endpoint for its protocol (HTTP and gRPC: the gateway's HTTP port; Thrift: its Thrift port; the address is the
/// gateway's advertised host), metadata `function`. It follows the catalog (deploys, releases, deletes) and keeps
/// each registration alive with a `RegistrationKeeper`, so registrations come back after the registry restarts
/// (etcd) or apusd restarts (embedded); on stop it deregisters them all.
public actor MeshPublisher {
    /// Where callers reach the gateway; nil until its listeners are bound.
    public struct GatewayAddress: Sendable, Equatable {
        public var address: String
        public var httpPort: Int
        public var thriftPort: Int?

        public init(address: String, httpPort: Int, thriftPort: Int?) {
            self.address = address
            self.httpPort = httpPort
            self.thriftPort = thriftPort
        }
    }

    private let registry: any ServiceRegistry
    private let catalog: FunctionCatalog
    private let gateway: @Sendable () -> GatewayAddress?
    private let ttlSeconds: Int
    private let logger: Logger
    private var keepers: [String: (endpoint: ServiceEndpoint, keeper: RegistrationKeeper)] = [:]
    private var generation: UInt64?
    private var warnedNoThrift: Set<String> = []

    public init(registry: any ServiceRegistry, catalog: FunctionCatalog, gateway: @escaping @Sendable () -> GatewayAddress?,
                ttlSeconds: Int = 10, logger: Logger) {
        self.registry = registry
        self.catalog = catalog
        self.gateway = gateway
        self.ttlSeconds = ttlSeconds
        self.logger = logger
    }

    /// The endpoint a function with the given protocol is registered with (nil: a Thrift function while the gateway
    /// has no Thrift port).
    static func endpoint(function: String, protocol wire: FunctionManifest.WireProtocol, gateway: GatewayAddress) -> ServiceEndpoint? {
        let port: Int
        switch wire {
        case .http, .grpc: port = gateway.httpPort
        case .thrift:
            guard let thrift = gateway.thriftPort else { return nil }
            port = thrift
        }
        return ServiceEndpoint(id: "\(function)@\(gateway.address):\(port)", address: gateway.address, port: port,
                               protocol: wire.rawValue, metadata: ["function": function])
    }

    /// Follows the catalog until the task is cancelled, then deregisters everything it registered.
    public func run(pollInterval: Duration = .milliseconds(100)) async {
        while !Task.isCancelled {
            await sync()
            try? await Task.sleep(for: pollInterval)
        }
        await stopAll()
    }

    /// Brings the registrations in line with the catalog (cheap when the catalog did not change).
    public func sync() async {
        guard let gateway = gateway() else { return }
        let (generation, wanted) = catalog.meshRegistrations()
        guard generation != self.generation else { return }
        self.generation = generation
        var desired: [String: ServiceEndpoint] = [:]
        for (service, target) in wanted {
            guard let endpoint = Self.endpoint(function: target.function, protocol: target.protocol, gateway: gateway) else {
                if warnedNoThrift.insert(service).inserted {
                    logger.warning("Thrift function not registered in the mesh: the gateway has no Thrift port (--thrift-port)",
                                   metadata: ["service": "\(service)", "function": "\(target.function)"])
                }
                continue
            }
            desired[service] = endpoint
        }
        for (service, current) in keepers where desired[service] != current.endpoint {
            keepers[service] = nil
            await current.keeper.stop()
            logger.info("mesh registration removed", metadata: ["service": "\(service)", "function": "\(current.endpoint.metadata["function"] ?? "")"])
        }
        for (service, endpoint) in desired.sorted(by: { $0.key < $1.key }) where keepers[service] == nil {
            let keeper = RegistrationKeeper(registry: registry, service: service, endpoint: endpoint, ttlSeconds: ttlSeconds, logger: logger)
            keepers[service] = (endpoint, keeper)
            await keeper.start()
            logger.info("mesh registration added", metadata: [
                "service": "\(service)", "function": "\(endpoint.metadata["function"] ?? "")",
                "endpoint": "\(endpoint.address):\(endpoint.port)", "protocol": "\(endpoint.protocol)"])
        }
    }

    /// Deregisters every function (apusd stopping), even from a cancelled task.
    public func stopAll() async {
        let all = keepers
        keepers = [:]
        generation = nil
        await Task {
            await withTaskGroup(of: Void.self) { group in
                for (_, entry) in all { group.addTask { await entry.keeper.stop() } }
            }
        }.value
    }
}
