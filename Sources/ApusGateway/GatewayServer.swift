#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import ApusScheduler
import ApusWire
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// A client connection that can be asked to finish its current work and close (graceful shutdown).
protocol DrainableConnection: AnyObject {
    func beginDrain()
}

/// What every connection of the gateway shares: configuration, the scheduler, per-loop upstream pools and the
/// registry of open client connections (for draining on shutdown).
final class GatewayShared: Sendable {
    let configuration: GatewayServer.Configuration
    let scheduler: Scheduler
    /// Version choice, protocol check, deadline and pool for every call the NIO edges serve.
    let dispatcher: Dispatcher
    let logger: Logger
    let requestIDs = RequestIDGenerator()
    /// Client connections held now, over every listener (`configuration.maxConnections` at most).
    let admitted = Atomic<Int>(0)
    /// Connections closed at accept because `maxConnections` were held.
    let refusedConnections = Atomic<Int>(0)
    /// Request body bytes all HTTP connections hold in memory (`configuration.httpMaxBufferedBytes` at most).
    let httpBodies: BufferedBytesBudget
    /// Requests refused (or connections closed) because `httpBodies` was full.
    let httpBodyRefusals = Atomic<Int>(0)

    /// One holder's request body bytes in memory change from `old` to `new`: false (and counted, nothing held
    /// more) when all HTTP connections together would go past `httpMaxBufferedBytes`.
    func holdBodyBytes(from old: Int, to new: Int) -> Bool {
        if httpBodies.update(from: old, to: new) { return true }
        let refused = httpBodyRefusals.wrappingAdd(1, ordering: .relaxed).newValue
        if refused == 1 || refused % 1000 == 0 {
            logger.warning("HTTP body buffer limit reached: requests that would hold more are refused", metadata: [
                "httpMaxBufferedBytes": "\(configuration.httpMaxBufferedBytes)", "held": "\(httpBodies.current)", "refused": "\(refused)"])
        }
        return false
    }

    static func bodyBufferFull(_ limit: Int) -> ApusError {
        ApusError(.overloaded, "the gateway holds its limit of \(limit) bytes of request bodies for all connections (apusd --http-max-buffered); retry shortly")
    }

    /// Takes a place for a new client connection; false (and counted) when every place is taken.
    func admit() -> Bool {
        let now = admitted.wrappingAdd(1, ordering: .relaxed).newValue
        guard now > configuration.maxConnections else { return true }
        admitted.wrappingSubtract(1, ordering: .relaxed)
        let refused = refusedConnections.wrappingAdd(1, ordering: .relaxed).newValue
        if refused == 1 || refused % 1000 == 0 {
            logger.warning("connection limit reached: new connections are closed at accept", metadata: [
                "maxConnections": "\(configuration.maxConnections)", "refused": "\(refused)"])
        }
        return false
    }

    func leave() {
        admitted.wrappingSubtract(1, ordering: .relaxed)
    }

    /// Whether the caller may invoke `function` (its `auth:`, if it has one): throws 401/403/503 with the reason.
    /// Returns whether the credential may stay in the request the instance gets (true also when there is no
    /// `auth:`: the header is the function's business then).
    func authorizeInvocation(function: String, credential: String?) throws(ApusError) -> Bool {
        guard let auth = scheduler.catalog.invocationAuth(of: function) else { return true }
        guard let invocationGuard = configuration.invocationGuard else {
            throw ApusError(.unavailable, "function \(function) has auth: but this gateway cannot check credentials")
        }
        do throws(ApusError) {
            return try invocationGuard.authorize(function: function, auth: auth, credential: credential)
        } catch {
            logger.debug("invocation refused", metadata: ["function": "\(function)", "code": "\(error.code)", "reason": "\(error.message)"])
            throw error
        }
    }

    /// For a NIO listener's new child channel: admits it (or closes it) and gives its place back when it closes.
    /// `force`: a connection the reactor already admitted, handed over.
    func admit(_ channel: any Channel, force: Bool = false) -> Bool {
        if force {
            admitted.wrappingAdd(1, ordering: .relaxed)
        } else if !admit() {
            channel.close(promise: nil)
            return false
        }
        channel.closeFuture.whenComplete { [self] _ in leave() }
        return true
    }

    /// The error for an instance that failed a call: `reason` as the relay saw it, and why the instance went when
    /// the runtime knows (an OOM kill). `known` is true then: the call must not be sent again (it would kill the
    /// next instance the same way).
    func instanceFailure(_ reason: String, instanceID: String?) -> (error: ApusError, known: Bool) {
        guard let instanceID, let why = scheduler.instanceFailureReason(instanceID) else {
            return (ApusError(.instanceError, reason), false)
        }
        return (ApusError(.instanceError, "\(reason): instance \(instanceID) \(why)"), true)
    }

    /// How long a call that failed on a still-running instance waits for the instance's end before its client is
    /// answered without knowing why (an OOM kill reaches the runtime moments after the connection closes).
    static let instanceEndWait: Duration = .milliseconds(500)
    static let instanceEndPoll: TimeAmount = .milliseconds(10)

    /// Hands `body` the error for an instance that failed a call, once it is settled: at once when the runtime
    /// knows why or the instance's process is gone, otherwise when the process ends or `instanceEndWait` passed
    /// (checked every `instanceEndPoll` on `loop`, the caller's loop). `body` runs on `loop`; the caller checks that
    /// what failed is still current.
    func settleInstanceFailure(_ reason: String, instanceID: String?, on loop: any EventLoop,
                               _ body: @escaping (_ error: ApusError, _ known: Bool) -> Void) {
        let deadline = NIODeadline.now() + TimeAmount.nanoseconds(Self.instanceEndWait.nanoseconds)
        func check() {
            let failure = instanceFailure(reason, instanceID: instanceID)
            guard !failure.known, let instanceID, scheduler.instanceIsRunning(instanceID), NIODeadline.now() < deadline else {
                body(failure.error, failure.known)
                return
            }
            loop.assumeIsolated().scheduleTask(in: Self.instanceEndPoll) { check() }
        }
        check()
    }
    private let pools: [ObjectIdentifier: UpstreamPool]
    private let http2Pools: [ObjectIdentifier: InstanceHTTP2Pool]
    private let http1Pools: [ObjectIdentifier: InstanceHTTP1Pool]
    private let thriftPools: [ObjectIdentifier: InstanceThriftPool]
    /// Each event loop's place on the instances' consistent-hash ring (its shard when a version has more ready
    /// instances than the scheduler's shard size).
    private let shardKeys: [ObjectIdentifier: UInt64]
    private let splitRolls: [ObjectIdentifier: LoopSplitRoll]
    private let deadlines: [ObjectIdentifier: CallDeadlines]
    private let connections = Mutex<[ObjectIdentifier: NIOLoopBound<any DrainableConnection>]>([:])
    private let draining = Atomic<Bool>(false)

    init(configuration: GatewayServer.Configuration, scheduler: Scheduler, logger: Logger, group: any EventLoopGroup) {
        self.configuration = configuration
        self.scheduler = scheduler
        self.dispatcher = Dispatcher(scheduler: scheduler)
        self.logger = logger
        self.httpBodies = BufferedBytesBudget(limit: configuration.httpMaxBufferedBytes)
        var pools: [ObjectIdentifier: UpstreamPool] = [:]
        var http2Pools: [ObjectIdentifier: InstanceHTTP2Pool] = [:]
        var http1Pools: [ObjectIdentifier: InstanceHTTP1Pool] = [:]
        var thriftPools: [ObjectIdentifier: InstanceThriftPool] = [:]
        var shardKeys: [ObjectIdentifier: UInt64] = [:]
        var splitRolls: [ObjectIdentifier: LoopSplitRoll] = [:]
        var deadlines: [ObjectIdentifier: CallDeadlines] = [:]
        for (index, loop) in group.makeIterator().enumerated() {
            splitRolls[ObjectIdentifier(loop)] = LoopSplitRoll()
            deadlines[ObjectIdentifier(loop)] = CallDeadlines(eventLoop: loop)
            shardKeys[ObjectIdentifier(loop)] = ConsistentHashRing.hash("\(configuration.nodeName)/worker-\(index)")
            thriftPools[ObjectIdentifier(loop)] = InstanceThriftPool(eventLoop: loop)
            pools[ObjectIdentifier(loop)] = UpstreamPool(eventLoop: loop)
            http2Pools[ObjectIdentifier(loop)] = InstanceHTTP2Pool(eventLoop: loop, limits: configuration.http2)
            http1Pools[ObjectIdentifier(loop)] = InstanceHTTP1Pool(eventLoop: loop)
        }
        self.pools = pools
        self.http2Pools = http2Pools
        self.http1Pools = http1Pools
        self.thriftPools = thriftPools
        self.shardKeys = shardKeys
        self.splitRolls = splitRolls
        self.deadlines = deadlines
    }

    /// The shard key of requests arriving on `loop`.
    func shardKey(for loop: any EventLoop) -> UInt64 {
        shardKeys[ObjectIdentifier(loop)] ?? 0
    }

    /// A number in 0..<100 for a release's traffic split, for a request arriving on `loop` (call it on `loop`).
    func roll(on loop: any EventLoop) -> Int {
        splitRolls[ObjectIdentifier(loop)]!.next()
    }

    /// The deadlines of the calls on `loop` under one timer (gRPC calls, HTTP/2 relays, Thrift calls).
    func callDeadlines(for loop: any EventLoop) -> CallDeadlines {
        deadlines[ObjectIdentifier(loop)]!
    }

    /// Connections to Thrift instances from this loop.
    func instanceThriftPool(for loop: any EventLoop) -> InstanceThriftPool {
        thriftPools[ObjectIdentifier(loop)]!
    }

    func upstreamPool(for loop: any EventLoop) -> UpstreamPool {
        pools[ObjectIdentifier(loop)]!
    }

    /// Multiplexed HTTP/2 connections to gRPC instances from this loop.
    func instanceHTTP2Pool(for loop: any EventLoop) -> InstanceHTTP2Pool {
        http2Pools[ObjectIdentifier(loop)]!
    }

    /// HTTP/1.1 connections to HTTP instances for requests that arrived over HTTP/2.
    func instanceHTTP1Pool(for loop: any EventLoop) -> InstanceHTTP1Pool {
        http1Pools[ObjectIdentifier(loop)]!
    }

    func register(_ handler: any DrainableConnection, id: ObjectIdentifier, eventLoop: any EventLoop) {
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
        for pool in http2Pools.values {
            try? await pool.eventLoop.submit { pool.closeAll() }.get()
        }
        for pool in http1Pools.values {
            try? await pool.eventLoop.submit { pool.closeAll() }.get()
        }
        for pool in thriftPools.values {
            try? await pool.eventLoop.submit { pool.closeAll() }.get()
        }
    }
}

/// The edge as a swift-service-lifecycle `Service`: binds the HTTP port (HTTP/1.1 and h2c) and, when configured,
/// the TLS port (ALPN h2 / http/1.1); on graceful shutdown stops accepting, lets in-flight requests finish
/// (closing idle connections at once, GOAWAY on HTTP/2) and then returns.
public final class GatewayServer: Service {
    /// HTTP/2 limits announced to clients (and used towards gRPC instances).
    public struct HTTP2Limits: Sendable {
        public var maxConcurrentStreams = 256
        /// Per-stream flow-control window.
        public var initialWindowSize = 1 << 20
        /// Connection-wide flow-control window.
        public var connectionWindowSize = 8 << 20
        public var maxFrameSize = 1 << 14
        public var maxHeaderListSize = 64 << 10

        public init() {}
    }

    /// Where the TLS listener finds its certificate chain and key (PEM files).
    public struct TLS: Sendable {
        public var port: Int
        public var certificatePath: String
        public var keyPath: String

        public init(port: Int, certificatePath: String, keyPath: String) {
            self.port = port
            self.certificatePath = certificatePath
            self.keyPath = keyPath
        }
    }

    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        /// Host routing: `<function>.<domain>`.
        public var domain: String
        public var maxRequestBytes: Int
        /// Longest wait for in-flight requests on shutdown.
        public var drainTimeout: Duration
        public var http2: HTTP2Limits
        public var tls: TLS?
        /// The Thrift listener's port (nil: no Thrift listener; 0: a free port).
        public var thriftPort: Int?
        /// Largest Thrift frame or unframed message accepted.
        public var thriftMaxFrameBytes: Int
        /// Most bytes all Thrift connections together may hold in messages not whole yet (`BufferedBytesBudget`).
        public var thriftMaxBufferedBytes: Int = 256 << 20
        /// Most bytes of request bodies all HTTP connections together may hold whole in memory: HTTP/2 and gRPC
        /// streams waiting for an instance, bodies of asynchronous invocations being collected, and HTTP/1.1 bytes
        /// read ahead of the instance beyond `BufferedBytesBudget.freePerConnection`. Past it, the request that would
        /// go over is refused (429) or its connection closed.
        public var httpMaxBufferedBytes: Int = 256 << 20
        /// Checks callers of functions with `auth:` (nil: such functions are refused, 503).
        public var invocationGuard: (any InvocationGuard)?
        /// Turns asynchronous invocations into tasks (nil: `X-Apus-Invocation: async` is refused).
        public var tasks: (any AsyncTaskSubmitter)?
        /// This gateway's name on the instances' hash ring (distinct per gateway node once there are several).
        public var nodeName: String = "gateway"
        /// Serve plaintext HTTP/1.1 on reactor threads of the gateway's own (`EdgeReactor`), handing every
        /// other case to SwiftNIO; false: SwiftNIO serves the HTTP port alone.
        public var http1Reactor: Bool = true
        /// Client connections the gateway holds at once, over all its listeners; past it new ones are closed at
        /// once (existing ones are served on). Default: what the process's descriptor limit leaves for them.
        public var maxConnections: Int = GatewayServer.Configuration.defaultMaxConnections()
        /// An HTTP/1.1 connection waiting for its next request is closed after this long (keep-alive timeout).
        public var idleTimeout: Duration = .seconds(60)
        /// A request head must arrive whole within this long of the connection becoming ready for it
        /// (slowloris); past it the client gets 408 and the connection closes.
        public var headTimeout: Duration = .seconds(10)

        /// Raises the soft descriptor limit to the hard one and keeps half of it for client connections; the
        /// rest is for instance connections, instances' pipes, the stores and logs.
        public static func defaultMaxConnections() -> Int {
            var limit = rlimit()
            guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 4096 }
            if limit.rlim_cur < limit.rlim_max {
                var raised = limit
                raised.rlim_cur = limit.rlim_max
                if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
            }
            return max(64, Int(min(limit.rlim_cur, 1 << 20)) / 2)
        }

        public init(host: String = "127.0.0.1", port: Int = 8080, domain: String = "apus.localhost",
                    maxRequestBytes: Int = 32 << 20, drainTimeout: Duration = .seconds(60),
                    http2: HTTP2Limits = HTTP2Limits(), tls: TLS? = nil,
                    thriftPort: Int? = nil, thriftMaxFrameBytes: Int = 16 << 20, tasks: (any AsyncTaskSubmitter)? = nil) {
            self.tasks = tasks
            self.thriftPort = thriftPort
            self.thriftMaxFrameBytes = thriftMaxFrameBytes
            self.host = host
            self.port = port
            self.domain = domain
            self.maxRequestBytes = maxRequestBytes
            self.drainTimeout = drainTimeout
            self.http2 = http2
            self.tls = tls
        }
    }

    private let configuration: Configuration
    private let shared: GatewayShared
    private let group: any EventLoopGroup
    private let onRunning: @Sendable (_ ports: BoundPorts) async -> Void

    /// The ports the listeners bound.
    public struct BoundPorts: Sendable {
        public var http: Int
        public var tls: Int?
        public var thrift: Int?
    }
    private let logger: Logger

    public init(configuration: Configuration, scheduler: Scheduler, logger: Logger,
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                onRunning: @escaping @Sendable (_ ports: BoundPorts) async -> Void) {
        self.configuration = configuration
        self.group = group
        self.shared = GatewayShared(configuration: configuration, scheduler: scheduler, logger: logger, group: group)
        self.onRunning = onRunning
        self.logger = logger
    }

    /// Loads the TLS certificate and key, offering h2 and http/1.1 by ALPN. Fails with a clear message.
    public static func makeTLSContext(_ tls: TLS) throws(ApusError) -> NIOSSLContext {
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(tls.certificatePath).map { NIOSSLCertificateSource.certificate($0) }
            guard !chain.isEmpty else { throw ApusError(.badRequest, "no certificate in \(tls.certificatePath)") }
            let key = try NIOSSLPrivateKey(file: tls.keyPath, format: .pem)
            var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
            configuration.applicationProtocols = ["h2", "http/1.1"]
            return try NIOSSLContext(configuration: configuration)
        } catch let error as ApusError {
            throw error
        } catch {
            throw ApusError(.badRequest, "cannot use TLS certificate \(tls.certificatePath) with key \(tls.keyPath): \(error)")
        }
    }

    public func run() async throws {
        let shared = self.shared
        var server: (any Channel)?
        var reactor: EdgeReactor?
        let port: Int
        if configuration.http1Reactor {
            let edge = try EdgeReactor(shared: shared, host: configuration.host, port: configuration.port,
                                       threads: Array(group.makeIterator()).count, group: group)
            edge.start()
            reactor = edge
            port = edge.port
        } else {
            let channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        guard shared.admit(channel) else { return }
                        try channel.pipeline.syncOperations.addHandler(ConnectionTimeouts(shared.configuration))
                        try channel.pipeline.syncOperations.addHandler(EdgeProtocolDetector(shared: shared))
                    }
                }
                .bind(host: configuration.host, port: configuration.port)
                .get()
            server = channel
            port = channel.localAddress?.port ?? configuration.port
        }
        logger.info("gateway listening", metadata: [
            "address": "\(configuration.host):\(port)", "http1": "\(reactor == nil ? "nio" : "reactor")",
        ])

        var tlsServer: (any Channel)?
        if let tls = configuration.tls {
            let context = try Self.makeTLSContext(tls)
            tlsServer = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        guard shared.admit(channel) else { return }
                        try channel.pipeline.syncOperations.addHandler(ConnectionTimeouts(shared.configuration))
                        try EdgePipeline.configureTLS(channel, shared: shared, sslHandler: NIOSSLServerHandler(context: context))
                    }
                }
                .bind(host: configuration.host, port: tls.port)
                .get()
            logger.info("gateway listening (TLS)", metadata: ["address": "\(configuration.host):\(tlsServer?.localAddress?.port ?? tls.port)"])
        }
        var thriftServer: (any Channel)?
        if let thriftPort = configuration.thriftPort {
            let maxFrame = configuration.thriftMaxFrameBytes
            let budget = BufferedBytesBudget(limit: configuration.thriftMaxBufferedBytes)
            thriftServer = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 1024)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        guard shared.admit(channel) else { return }
                        try channel.pipeline.syncOperations.addHandler(ConnectionTimeouts(shared.configuration))
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(ThriftFrameDecoder(maxFrameSize: maxFrame, budget: budget)))
                        try channel.pipeline.syncOperations.addHandler(ThriftEdgeConnection(shared: shared))
                    }
                }
                .bind(host: configuration.host, port: thriftPort)
                .get()
            logger.info("gateway listening (Thrift)", metadata: ["address": "\(configuration.host):\(thriftServer?.localAddress?.port ?? thriftPort)"])
        }
        await onRunning(BoundPorts(http: port, tls: tlsServer?.localAddress?.port, thrift: thriftServer?.localAddress?.port))

        try? await gracefulShutdown()
        let reactorConnections = { reactor?.openConnections.load(ordering: .relaxed) ?? 0 }
        logger.info("gateway draining", metadata: ["connections": "\(shared.openConnections + reactorConnections())"])
        try? await server?.close()
        try? await tlsServer?.close()
        try? await thriftServer?.close()
        reactor?.drain()
        shared.drainAll()
        let deadline = ContinuousClock.now.advanced(by: configuration.drainTimeout)
        while shared.openConnections + reactorConnections() > 0, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        await reactor?.stop()
        await shared.closeIdleUpstreams()
        logger.info("gateway stopped")
    }
}
