import ApusCore
import ApusScheduler
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// What every connection of the gateway shares: configuration, the scheduler, per-loop upstream pools and the
/// registry of open client connections (for draining on shutdown).
final class GatewayShared: Sendable {
    let configuration: GatewayServer.Configuration
    let scheduler: Scheduler
    let logger: Logger
    let requestIDs = RequestIDGenerator()
    private let pools: [ObjectIdentifier: UpstreamPool]
    private let connections = Mutex<[ObjectIdentifier: NIOLoopBound<GatewayConnectionHandler>]>([:])
    private let draining = Atomic<Bool>(false)

    init(configuration: GatewayServer.Configuration, scheduler: Scheduler, logger: Logger, group: any EventLoopGroup) {
        self.configuration = configuration
        self.scheduler = scheduler
        self.logger = logger
        var pools: [ObjectIdentifier: UpstreamPool] = [:]
        for loop in group.makeIterator() {
            pools[ObjectIdentifier(loop)] = UpstreamPool(eventLoop: loop)
        }
        self.pools = pools
    }

    func upstreamPool(for loop: any EventLoop) -> UpstreamPool {
        pools[ObjectIdentifier(loop)]!
    }

    func register(_ handler: GatewayConnectionHandler, id: ObjectIdentifier, eventLoop: any EventLoop) {
        connections.withLock { $0[id] = NIOLoopBound(handler, eventLoop: eventLoop) }
        if draining.load(ordering: .acquiring) { handler.beginDrain() }
    }

    func unregister(id: ObjectIdentifier) {
        _ = connections.withLock { $0.removeValue(forKey: id) }
    }

    var openConnections: Int { connections.withLock { $0.count } }

    /// Asks every open connection to close once its current response is done.
    func drainAll() {
        draining.store(true, ordering: .releasing)
        for handler in connections.withLock({ Array($0.values) }) {
            handler.eventLoop.execute { handler.value.beginDrain() }
        }
    }

    func closeIdleUpstreams() async {
        for pool in pools.values {
            try? await pool.eventLoop.submit { pool.closeAll() }.get()
        }
    }
}

/// The HTTP/1.1 edge as a swift-service-lifecycle `Service`: binds the listener, and on graceful shutdown stops
/// accepting, lets in-flight requests finish (closing idle keep-alive connections at once) and then returns.
public final class GatewayServer: Service {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        /// Host routing: `<function>.<domain>`.
        public var domain: String
        public var maxRequestBytes: Int
        /// Longest wait for in-flight requests on shutdown.
        public var drainTimeout: Duration

        public init(host: String = "127.0.0.1", port: Int = 8080, domain: String = "apus.localhost",
                    maxRequestBytes: Int = 32 << 20, drainTimeout: Duration = .seconds(60)) {
            self.host = host
            self.port = port
            self.domain = domain
            self.maxRequestBytes = maxRequestBytes
            self.drainTimeout = drainTimeout
        }
    }

    private let configuration: Configuration
    private let shared: GatewayShared
    private let group: any EventLoopGroup
    private let onRunning: @Sendable (Int) async -> Void
    private let logger: Logger

    public init(configuration: Configuration, scheduler: Scheduler, logger: Logger,
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                onRunning: @escaping @Sendable (Int) async -> Void) {
        self.configuration = configuration
        self.group = group
        self.shared = GatewayShared(configuration: configuration, scheduler: scheduler, logger: logger, group: group)
        self.onRunning = onRunning
        self.logger = logger
    }

    public func run() async throws {
        let shared = self.shared
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(GatewayConnectionHandler(shared: shared))
                }
            }
            .bind(host: configuration.host, port: configuration.port)
            .get()
        let port = server.localAddress?.port ?? configuration.port
        logger.info("gateway listening", metadata: ["address": "\(configuration.host):\(port)"])
        await onRunning(port)

        try? await gracefulShutdown()
        logger.info("gateway draining", metadata: ["connections": "\(shared.openConnections)"])
        try? await server.close()
        shared.drainAll()
        let deadline = ContinuousClock.now.advanced(by: configuration.drainTimeout)
        while shared.openConnections > 0, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        await shared.closeIdleUpstreams()
        logger.info("gateway stopped")
    }
}
