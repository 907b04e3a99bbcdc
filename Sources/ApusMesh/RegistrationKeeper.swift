import Logging

/// Keeps one endpoint registered for as long as it runs: registers, heartbeats every TTL/3, registers again when the
/// registry lost the lease (`leaseNotFound`: it expired, or etcd / apusd restarted without it) or was unreachable
/// (with back-off, 200 ms doubling to at most TTL/3), and deregisters on `stop()`. Used by `apusd` for functions
/// with `mesh.service` and by `apus-sidecar` for the instance it fronts.
///
/// ```swift
/// let keeper = RegistrationKeeper(registry: registry, service: "payments.refund", endpoint: endpoint, ttlSeconds: 10, logger: logger)
/// await keeper.start()
/// await keeper.setHealthy(false)   // reported now and kept across re-registrations
/// await keeper.stop()              // deregisters
/// ```
public actor RegistrationKeeper {
    public nonisolated let service: String
    public nonisolated let ttlSeconds: Int
    private let registry: any ServiceRegistry
    private var endpoint: ServiceEndpoint
    private let logger: Logger
    private var loop: Task<Void, Never>?
    /// The lease currently held (nil before the first registration and while re-registering).
    public private(set) var lease: RegistrationLease?
    /// How many times the endpoint was registered (1 once up; more after leases were lost).
    public private(set) var registrations = 0

    public init(registry: any ServiceRegistry, service: String, endpoint: ServiceEndpoint, ttlSeconds: Int = 10, logger: Logger) {
        self.registry = registry
        self.service = service
        self.endpoint = endpoint
        self.ttlSeconds = max(1, ttlSeconds)
        var logger = logger
        logger[metadataKey: "service"] = "\(service)"
        logger[metadataKey: "endpoint"] = "\(endpoint.id)"
        self.logger = logger
    }

    /// The interval between heartbeats: a third of the TTL.
    var heartbeatInterval: Duration { .milliseconds(ttlSeconds * 1000 / 3) }

    /// Starts keeping the registration (returns at once; the first registration happens in the background).
    public func start() {
        guard loop == nil else { return }
        loop = Task { await self.keep() }
    }

    /// Starts and waits until the first registration succeeded (or throws its error when the registry refuses it
    /// as invalid, which retrying cannot fix).
    public func startAndWait() async throws {
        let lease = try await registry.register(service: service, endpoint: endpoint, ttlSeconds: ttlSeconds)
        adopt(lease)
        start()
    }

    private func adopt(_ lease: RegistrationLease) {
        self.lease = lease
        registrations += 1
        if registrations > 1 {
            logger.notice("registered again", metadata: ["lease": "\(lease.leaseID)", "registrations": "\(registrations)"])
        } else {
            logger.info("registered", metadata: ["lease": "\(lease.leaseID)", "ttlSeconds": "\(ttlSeconds)"])
        }
    }

    private func keep() async {
        var backoff: Duration = .milliseconds(200)
        let cap = max(heartbeatInterval, .milliseconds(200))
        // After `startAndWait` registered, the first heartbeat is due a third of the TTL later.
        if lease != nil { try? await Task.sleep(for: heartbeatInterval) }
        while !Task.isCancelled {
            do {
                if let lease {
                    try await registry.heartbeat(lease)
                } else {
                    let fresh = try await registry.register(service: service, endpoint: endpoint, ttlSeconds: ttlSeconds)
                    if Task.isCancelled {
                        // stop() came while registering: do not leave this registration behind.
                        try? await registry.deregister(fresh)
                        return
                    }
                    adopt(fresh)
                }
                backoff = .milliseconds(200)
                try? await Task.sleep(for: heartbeatInterval)
            } catch RegistryError.leaseNotFound {
                logger.warning("registry lost the lease, registering again", metadata: ["lease": "\(lease?.leaseID ?? "-")"])
                lease = nil
            } catch RegistryError.invalid(let reason) {
                logger.error("registry refused the registration", metadata: ["reason": "\(reason)"])
                try? await Task.sleep(for: .seconds(5))
            } catch {
                logger.warning("registry unreachable, retrying", metadata: ["error": "\(error)", "retryIn": "\(backoff)"])
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, cap)
            }
        }
    }

    /// Reports the endpoint healthy or not (the registry keeps it, callers skip unhealthy endpoints); the flag
    /// survives re-registration.
    public func setHealthy(_ healthy: Bool) async {
        guard endpoint.healthy != healthy else { return }
        endpoint.healthy = healthy
        guard let lease else { return }
        do {
            try await registry.setHealth(lease, healthy: healthy)
        } catch {
            logger.warning("could not report health; it is sent with the next registration", metadata: ["healthy": "\(healthy)", "error": "\(error)"])
        }
    }

    public var isHealthy: Bool { endpoint.healthy }

    /// Stops heartbeating and deregisters (the entry goes at once instead of at its TTL). The deregistration runs
    /// even when the caller's task is already cancelled (a stopping process).
    public func stop() async {
        loop?.cancel()
        await loop?.value
        loop = nil
        guard let lease else { return }
        self.lease = nil
        let registry = self.registry
        let result = await Task { try await registry.deregister(lease) }.result
        switch result {
        case .success: logger.info("deregistered")
        case .failure(let error):
            logger.warning("deregistration failed; the entry expires with its lease", metadata: ["error": "\(error)"])
        }
    }
}
