import ApusControl
import ApusMesh
import ApusScheduler
import Logging
import ServiceLifecycle

/// The daemon's service-mesh parts: the registry (`--registry embedded` in this process, or etcd), what the
/// sidecars are told to use, the embedded registry's expiry sweeper and the publisher that keeps functions with
/// `mesh.service` registered.
struct MeshSetup {
    let registry: any SnapshottingServiceRegistry
    let sidecarRegistryURL: @Sendable () -> String?
    let gateway: @Sendable () -> MeshPublisher.GatewayAddress?

    init(registry url: String, host: String, advertiseAddress: String?, ports: BoundPorts) throws {
        let logger = Logger(label: "apus.registry")
        let address = advertiseAddress ?? host
        if url == "embedded" {
            registry = EmbeddedRegistry(logger: logger)
            // Sidecars reach the embedded registry through the API (loopback when the API listens everywhere).
            sidecarRegistryURL = { ports.apiURL }
        } else {
            registry = try makeSnapshottingServiceRegistry(url: url, logger: logger)
            sidecarRegistryURL = { url }
        }
        gateway = {
            ports.gatewayPorts.map { MeshPublisher.GatewayAddress(address: address, httpPort: $0.http, thriftPort: $0.thrift) }
        }
    }

    /// Expires embedded leases as their TTL passes (nothing to do for etcd, which expires its own).
    var registryService: some Service {
        RegistrySweeper(registry: registry as? EmbeddedRegistry)
    }

    func publisherService(catalog: FunctionCatalog) -> some Service {
        PublisherService(publisher: MeshPublisher(registry: registry, catalog: catalog, gateway: gateway, logger: Logger(label: "apus.mesh")))
    }
}

struct RegistrySweeper: Service {
    let registry: EmbeddedRegistry?

    func run() async throws {
        guard let registry else {
            try? await gracefulShutdown()
            return
        }
        await cancelWhenGracefulShutdown { await registry.run() }
    }
}

/// Runs the publisher until shutdown; it deregisters every function before returning.
struct PublisherService: Service {
    let publisher: MeshPublisher

    func run() async throws {
        await cancelWhenGracefulShutdown { await publisher.run() }
    }
}
