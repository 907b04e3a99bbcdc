import ApusMesh
import Foundation
import Logging
import NIOCore
import NIOPosix
import Prometheus
import Synchronization

/// The sidecar as a whole: listeners (outbound, inbound, admin, per-upstream Thrift ports), registration with
/// heartbeats, app health reporting, reload and graceful stop.
public final class Sidecar: Sendable {
    public let shared: SidecarShared
    public let registry: any ServiceRegistry
    private let group: any EventLoopGroup
    private let logger: Logger
    private let metrics: PrometheusCollectorRegistry?

    private struct State {
        var config: SidecarConfig
        var outbound: (any Channel)?
        var inbound: (any Channel)?
        var admin: (any Channel)?
        var thrift: [String: (port: Int, channel: any Channel)] = [:]
        var lease: RegistrationLease?
        var background: Task<Void, Never>?
        var reportedHealthy: Bool?
    }

    private let state: Mutex<State>
    /// The app's health as last probed. With a health check it starts unhealthy: the instance is registered as
    /// such and receives traffic once a probe has passed.
    private let healthy: Atomic<Bool>

    /// The ports actually bound (useful with port 0).
    public struct BoundPorts: Codable, Sendable, Equatable {
        public var outbound: Int?
        public var inbound: Int?
        public var admin: Int?
        public var thrift: [String: Int]
    }

    public init(config: SidecarConfig, registry: any ServiceRegistry, group: any EventLoopGroup,
                metrics: PrometheusCollectorRegistry?, logger: Logger) {
        self.registry = registry
        self.group = group
        self.logger = logger
        self.metrics = metrics
        let loops = Array(group.makeIterator())
        let directory = UpstreamDirectory(registry: registry, config: config, logger: logger)
        self.shared = SidecarShared(directory: directory, config: config, eventLoops: loops, logger: logger)
        self.state = Mutex(State(config: config))
        self.healthy = Atomic(config.appPort == nil || config.inbound.healthCheck.kind == .none)
    }

    public var appHealthy: Bool { healthy.load(ordering: .relaxed) }

    /// Binds every listener and starts registration and health checks.
    public func start() async throws -> BoundPorts {
        let config = state.withLock { $0.config }
        shared.directory.preload()
        var ports = BoundPorts(thrift: [:])
        if let port = config.outboundPort {
            let channel = try await bindNamed("outbound", port) {
                try await ProxyPipeline.bind(group: group, host: config.outboundAddress ?? config.address, port: port, shared: shared, side: .outbound)
            }
            state.withLock { $0.outbound = channel }
            ports.outbound = channel.localAddress?.port
        }
        if let port = config.inboundPort {
            guard let app = shared.app else { throw ConfigError("app_port", "--inbound-port needs --app-port") }
            let channel = try await bindNamed("inbound", port) {
                if config.appProtocol == "thrift" {
                    try await TCPRelay.bindInbound(group: group, host: config.address, port: port, cluster: app, shared: shared)
                } else {
                    try await ProxyPipeline.bind(group: group, host: config.address, port: port, shared: shared, side: .inbound)
                }
            }
            state.withLock { $0.inbound = channel }
            ports.inbound = channel.localAddress?.port
        }
        if let port = config.adminPort {
            let channel = try await bindNamed("admin", port) {
                try await AdminServer.bind(group: group, host: config.address, port: port, sidecar: self, metrics: metrics)
            }
            state.withLock { $0.admin = channel }
            ports.admin = channel.localAddress?.port
        }
        try await syncThriftListeners(config)
        ports.thrift = state.withLock { $0.thrift.mapValues { $0.channel.localAddress?.port ?? $0.port } }
        let task = Task { await self.runBackground() }
        state.withLock { $0.background = task }
        return ports
    }

    private func bindNamed(_ what: String, _ port: Int, _ body: () async throws -> any Channel) async throws -> any Channel {
        do {
            return try await body()
        } catch {
            throw SidecarError("cannot listen on the \(what) port \(port): \(error)")
        }
    }

    /// Opens listeners for upstreams with a `thrift_port`, closes those no longer configured.
    private func syncThriftListeners(_ config: SidecarConfig) async throws {
        let wanted = config.upstreams.compactMapValues { $0.policy.thriftPort }
        let current = state.withLock { $0.thrift }
        for (name, entry) in current where wanted[name] != entry.port {
            try? await entry.channel.close()
            state.withLock { _ = $0.thrift.removeValue(forKey: name) }
        }
        for (name, port) in wanted.sorted(by: { $0.key < $1.key }) where current[name]?.port != port {
            guard let cluster = shared.directory.cluster(name) else { continue }
            let channel = try await bindNamed("thrift (\(name))", port) {
                try await TCPRelay.bindThriftCalls(group: group, host: config.address, port: port, cluster: cluster, shared: shared)
            }
            state.withLock { $0.thrift[name] = (port, channel) }
            logger.info("thrift listener", metadata: ["upstream": "\(name)", "port": "\(channel.localAddress?.port ?? port)"])
        }
    }

    /// A reloaded configuration (SIGHUP): policies, limits, static upstreams and Thrift ports change; listeners
    /// and open connections stay.
    public func reload(_ config: SidecarConfig) async throws {
        state.withLock { $0.config = config }
        shared.reload(config)
        if let staticRegistry = registry as? StaticRegistry {
            staticRegistry.replace(services: StaticRegistry.staticServices(config))
        }
        try await syncThriftListeners(config)
        logger.info("configuration reloaded", metadata: ["upstreams": "\(config.upstreams.keys.sorted())"])
    }

    // MARK: registration and health

    private func runBackground() async {
        let config = state.withLock { $0.config }
        await withTaskGroup(of: Void.self) { group in
            if config.appPort != nil, config.inbound.healthCheck.kind != .none {
                group.addTask { await self.healthLoop() }
            }
            if config.register, let service = config.service, let port = config.inboundPort {
                group.addTask { await self.registrationLoop(service: service, port: port) }
            }
        }
    }

    private func endpoint(service: String, port: Int, config: SidecarConfig) -> ServiceEndpoint {
        let boundPort = state.withLock { $0.inbound?.localAddress?.port } ?? port
        return ServiceEndpoint(
            id: config.instanceID ?? "\(config.address):\(boundPort)", address: config.address, port: boundPort,
            protocol: config.appProtocol, healthy: appHealthy)
    }

    private func registrationLoop(service: String, port: Int) async {
        var log = logger
        log[metadataKey: "service"] = "\(service)"
        while !Task.isCancelled {
            let config = state.withLock { $0.config }
            let lease = state.withLock { $0.lease }
            if let lease {
                try? await Task.sleep(for: .milliseconds(max(lease.ttlSeconds * 1000 / 3, 200)))
                if Task.isCancelled { return }
                do {
                    try await registry.heartbeat(lease)
                } catch RegistryError.leaseNotFound {
                    log.warning("registration lease lost; registering again")
                    state.withLock { $0.lease = nil; $0.reportedHealthy = nil }
                } catch {
                    log.warning("heartbeat failed", metadata: ["error": "\(error)"])
                }
            } else {
                do {
                    let registered = endpoint(service: service, port: port, config: config)
                    let lease = try await registry.register(service: service, endpoint: registered, ttlSeconds: config.registrationTTLSeconds)
                    // What the registry holds now; the health loop reports any change after this.
                    state.withLock { $0.lease = lease; $0.reportedHealthy = registered.healthy }
                    log.info("registered", metadata: ["endpoint": "\(lease.endpointID)", "ttl": "\(lease.ttlSeconds)s"])
                    if Task.isCancelled {
                        try? await registry.deregister(lease)
                        return
                    }
                } catch {
                    log.warning("registration failed; retrying", metadata: ["error": "\(error)"])
                    try? await Task.sleep(for: .seconds(1))
                }
            }
        }
    }

    private func healthLoop() async {
        let config = state.withLock { $0.config }
        guard let appPort = config.appPort else { return }
        let checker = AppHealthChecker(group: group, host: config.appAddress, port: appPort)
        var failures = 0
        while !Task.isCancelled {
            let check = state.withLock { $0.config.inbound.healthCheck }
            let ok = await checker.probe(check)
            failures = ok ? 0 : failures + 1
            // Healthy after one passing probe; unhealthy after `unhealthyAfter` failed ones in a row.
            let wasHealthy = healthy.load(ordering: .relaxed)
            let nowHealthy = ok || (wasHealthy && failures < check.unhealthyAfter)
            if nowHealthy != wasHealthy {
                healthy.store(nowHealthy, ordering: .relaxed)
                if nowHealthy { logger.info("app healthy") } else { logger.warning("app unhealthy", metadata: ["failedProbes": "\(failures)"]) }
            }
            let (lease, reported) = state.withLock { ($0.lease, $0.reportedHealthy) }
            if let lease, reported != nowHealthy {
                do {
                    try await registry.setHealth(lease, healthy: nowHealthy)
                    state.withLock { if $0.lease == lease { $0.reportedHealthy = nowHealthy } }
                } catch {
                    logger.warning("reporting health failed", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: check.interval)
        }
    }

    // MARK: stopping

    /// SIGTERM: deregister first, stop accepting inbound traffic, let in-flight requests finish (up to the drain
    /// timeout), then close everything.
    public func shutdown() async {
        let (background, lease, drainTimeout) = state.withLock { state in
            defer { state.lease = nil; state.background = nil }
            return (state.background, state.lease, state.config.drainTimeout)
        }
        background?.cancel()
        if let lease {
            do {
                try await registry.deregister(lease)
                logger.info("deregistered", metadata: ["service": "\(lease.service)", "endpoint": "\(lease.endpointID)"])
            } catch {
                logger.warning("deregistration failed", metadata: ["error": "\(error)"])
            }
        }
        let inbound = state.withLock { $0.inbound }
        try? await inbound?.close()
        shared.beginDrain()
        let started = ContinuousClock.now
        while shared.requestsInFlight > 0, ContinuousClock.now - started < drainTimeout {
            try? await Task.sleep(for: .milliseconds(20))
        }
        let left = shared.requestsInFlight
        logger.info("drained", metadata: ["inFlight": "\(left)", "after": "\(ContinuousClock.now - started)"])
        let channels = state.withLock { state -> [any Channel] in
            [state.outbound, state.admin].compactMap { $0 } + state.thrift.values.map(\.channel)
        }
        for channel in channels { try? await channel.close() }
        shared.directory.shutdown()
    }
}

public struct SidecarError: Error, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}
