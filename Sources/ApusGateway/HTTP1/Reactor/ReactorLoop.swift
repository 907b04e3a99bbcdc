import ApusCore
import ApusScheduler
import CApusShims
import Glibc
import NIOCore
import Synchronization

/// Something a reactor loop watches: a client connection or a connection to an instance. Subclasses handle the
/// readiness events; everything happens on the loop's thread.
class ReactorSocket {
    let fd: Int32
    /// Tells this socket's events from those of an earlier one that had the same descriptor number.
    let token: UInt64
    unowned(unsafe) let loop: ReactorLoop

    init(fd: Int32, loop: ReactorLoop) {
        self.fd = fd
        self.loop = loop
        self.token = loop.nextToken(fd: fd)
    }

    func handle(_ events: UInt32) {}

    /// Whether a write is waiting for the end of the loop's current batch of events.
    var flushScheduled = false

    /// Writes what is pending now.
    func flushNow() {}

    /// Writes what is pending once the loop has handled its current batch of events: requests and responses
    /// produced by one batch leave together, so the peers (instances, clients) are woken once per batch rather
    /// than once per message.
    final func flush() {
        loop.scheduleFlush(self)
    }
}

/// One reactor thread: an epoll instance (edge-triggered for connections), the listening socket shared with the
/// other loops (`EPOLLEXCLUSIVE`), an eventfd to be woken, the client and instance connections it serves and
/// its pool of idle keep-alive connections to instances.
final class ReactorLoop: @unchecked Sendable {
    unowned(unsafe) let reactor: EdgeReactor
    let index: Int
    /// The NIO event loop that takes connections this loop hands over.
    let handoffLoop: any EventLoop
    let shardKey: UInt64
    let allocator = ByteBufferAllocator()
    private let epollFD: Int32
    private let wakeFD: Int32
    private var sockets: [ReactorSocket?] = []
    private var generation: UInt64 = 0
    /// Idle keep-alive connections per instance id, and the list used last (most requests of a loop go to the
    /// same few instances: a string comparison instead of hashing the id twice per request).
    private var idleUpstreams: [String: IdleUpstreams] = [:]
    private var lastIdle: IdleUpstreams?
    private var splitRoll = SplitRoll()
    private var drainingSeen = false
    private var nextDeadlineScan: UInt64 = 0

    private static let listenToken = UInt64.max
    private static let wakeToken = UInt64.max - 1
    static let connectionEvents = APUS_EV_IN | APUS_EV_OUT | APUS_EV_RDHUP | APUS_EV_ET
    static let maxIdlePerInstance = 256
    /// How often requests are checked against their deadlines.
    static let deadlineScanInterval: UInt64 = 20_000_000  // 20 ms
    /// The gateway's keep-alive and request-head timeouts, in nanoseconds.
    lazy var idleTimeoutNanoseconds = UInt64(max(0, reactor.shared.configuration.idleTimeout.nanoseconds))
    lazy var headTimeoutNanoseconds = UInt64(max(0, reactor.shared.configuration.headTimeout.nanoseconds))

    /// The monotonic clock in nanoseconds, for request arrival times and deadlines.
    static func now() -> UInt64 {
        NIODeadline.now().uptimeNanoseconds
    }

    /// The clocks as read once per loop pass, right after `epoll_wait` returned: every event of the pass
    /// happened before, so they stand for "now" for arrival times, latencies, deadlines and slot hand-outs
    /// (reading the clocks per request cost several clock reads for each).
    private(set) var passNanoseconds: UInt64 = ReactorLoop.now()
    private(set) var passInstant: ContinuousClock.Instant = .now
    /// Wall-clock milliseconds since 1970 as of the pass (the deadline header instances get).
    private(set) var passWallClockMilliseconds = ReactorLoop.wallClockMilliseconds()

    static func wallClockMilliseconds() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
    }

    /// What every request reads, taken out of the shared gateway state once (no reference counting per request;
    /// the reactor, and with it this loop, lives shorter than the gateway state).
    unowned(unsafe) let catalog: FunctionCatalog
    unowned(unsafe) let requestIDs: RequestIDGenerator
    let domain: String
    let maxRequestBytes: Int

    init(reactor: EdgeReactor, index: Int, handoffLoop: any EventLoop, shardKey: UInt64) throws(ApusError) {
        self.reactor = reactor
        catalog = reactor.shared.scheduler.catalog
        requestIDs = reactor.shared.requestIDs
        domain = reactor.shared.configuration.domain
        maxRequestBytes = reactor.shared.configuration.maxRequestBytes
        self.index = index
        self.handoffLoop = handoffLoop
        self.shardKey = shardKey
        epollFD = apus_epoll_create()
        wakeFD = apus_eventfd()
        guard epollFD >= 0, wakeFD >= 0,
              apus_epoll_add(epollFD, reactor.listenFD, APUS_EV_IN | APUS_EV_EXCLUSIVE, Self.listenToken) == 0,
              apus_epoll_add(epollFD, wakeFD, APUS_EV_IN, Self.wakeToken) == 0 else {
            throw ApusError(.internal, "cannot set up the HTTP reactor's epoll: \(String(cString: strerror(errno)))")
        }
    }

    func nextToken(fd: Int32) -> UInt64 {
        generation &+= 1
        return (generation << 32) | UInt64(UInt32(bitPattern: fd))
    }

    func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    /// The thread's body: until the reactor stops.
    func run() {
        var events = [apus_event](repeating: apus_event(), count: 256)
        while !reactor.stopping.load(ordering: .acquiring) {
            let count = events.withUnsafeMutableBufferPointer { apus_epoll_wait(epollFD, $0.baseAddress, Int32($0.count), 20) }
            passNanoseconds = Self.now()
            passInstant = .now
            passWallClockMilliseconds = Self.wallClockMilliseconds()
            if count > 0 {
                for i in 0..<Int(count) {
                    let event = events[i]
                    switch event.data {
                    case Self.listenToken:
                        acceptAll()
                    case Self.wakeToken:
                        var value: UInt64 = 0
                        _ = Glibc.read(wakeFD, &value, 8)
                        adoptInbox()
                    default:
                        let fd = Int(UInt32(truncatingIfNeeded: event.data))
                        if fd < sockets.count, let socket = sockets[fd], socket.token == event.data {
                            socket.handle(event.events)
                        }
                    }
                }
            }
            flushPending()
            housekeeping()
        }
        closeEverything()
    }

    private var pendingFlush: [ReactorSocket] = []

    func scheduleFlush(_ socket: ReactorSocket) {
        guard !socket.flushScheduled else { return }
        socket.flushScheduled = true
        pendingFlush.append(socket)
    }

    /// Writes everything the batch produced. A write may produce more (a drained client resumes its instance
    /// connection, which relays more): those are written in the same pass.
    private func flushPending() {
        var index = 0
        while index < pendingFlush.count {
            let socket = pendingFlush[index]
            socket.flushScheduled = false
            socket.flushNow()
            index += 1
        }
        pendingFlush.removeAll(keepingCapacity: true)
    }

    private func housekeeping() {
        if !drainingSeen, reactor.draining.load(ordering: .acquiring) {
            drainingSeen = true
            _ = apus_epoll_remove(epollFD, reactor.listenFD)
            for case let client as ReactorClient in sockets.compactMap({ $0 }) { client.beginDrain() }
        }
        let now = passNanoseconds
        if now >= nextDeadlineScan {
            nextDeadlineScan = now &+ Self.deadlineScanInterval
            for socket in sockets { (socket as? ReactorClient)?.checkDeadline(now: now) }
        }
    }

    /// Accepts every waiting connection and deals them out to the loops in turn (a burst of connects would
    /// otherwise all land on whichever loop woke first).
    private func acceptAll() {
        while !drainingSeen {
            let fd = apus_accept(reactor.listenFD)
            guard fd >= 0 else { return }
            guard reactor.shared.admit() else {
                Glibc.close(fd)  // at the connection limit: refused, the ones held are served on
                continue
            }
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            reactor.openConnections.add(1, ordering: .relaxed)
            let target = reactor.loopForNextConnection()
            if target === self {
                adopt(fd)
            } else {
                target.inbox.withLock { $0.append(fd) }
                target.wake()
            }
        }
    }

    /// Connections other loops accepted for this one.
    let inbox = Mutex<[Int32]>([])

    private func adoptInbox() {
        let fds = inbox.withLock { fds in
            defer { fds.removeAll(keepingCapacity: true) }
            return fds
        }
        for fd in fds { adopt(fd) }
    }

    private func adopt(_ fd: Int32) {
        register(ReactorClient(fd: fd, loop: self, peer: SocketAddresses.peer(of: fd)))
        if drainingSeen, let client = sockets[Int(fd)] as? ReactorClient { client.beginDrain() }
    }

    /// Starts watching a socket (edge-triggered, reads and writes).
    func register(_ socket: ReactorSocket) {
        let fd = Int(socket.fd)
        if fd >= sockets.count { sockets.append(contentsOf: repeatElement(nil, count: max(64, fd + 1 - sockets.count))) }
        sockets[fd] = socket
        if apus_epoll_add(epollFD, socket.fd, Self.connectionEvents, socket.token) != 0 {
            sockets[fd] = nil
            Glibc.close(socket.fd)
        }
    }

    /// Stops watching a socket and closes it.
    func close(_ socket: ReactorSocket) {
        forget(socket)
        Glibc.close(socket.fd)
    }

    /// Stops watching a socket without closing it (it is being handed over).
    func forget(_ socket: ReactorSocket) {
        let fd = Int(socket.fd)
        if fd < sockets.count, sockets[fd] === socket {
            sockets[fd] = nil
            _ = apus_epoll_remove(epollFD, socket.fd)
        }
    }

    func clientClosed() {
        reactor.openConnections.subtract(1, ordering: .relaxed)
        reactor.shared.leave()
    }

    // MARK: routing

    /// Where a request goes once its version is chosen: the version's pool and the few facts about the version a
    /// request needs, copied out once (a `FunctionVersion` is large to copy per request).
    /// A class: a request keeps it with one reference count rather than one per field.
    final class Target {
        let pool: InstancePool
        let function: String
        let versionNumber: Int
        let timeout: Duration
        let timeoutMilliseconds: Int64
        let timeoutNanoseconds: UInt64
        let servesHTTP: Bool

        init(pool: InstancePool) {
            self.pool = pool
            let version = pool.version
            function = version.function
            versionNumber = version.number
            timeout = version.manifest.timeout
            timeoutMilliseconds = version.manifest.timeout.milliseconds
            timeoutNanoseconds = UInt64(max(0, timeoutMilliseconds)) * 1_000_000
            servesHTTP = version.manifest.protocol == .http
        }
    }

    /// A function's catalog entry as of `generation`, with the targets of the versions requests went to.
    private final class CachedFunction {
        let function: String
        let generation: UInt64
        let entry: FunctionCatalog.Entry
        /// The version that takes all traffic when the release names one version only (no roll needed).
        let soleVersion: Int?
        /// The function has `auth:`: its requests go to the NIO handler, which checks credentials.
        let guarded: Bool
        var pools: [Int: Target] = [:]
        /// The target used last (most requests go to the same version).
        var lastTarget: Target?

        init(function: String, generation: UInt64, entry: FunctionCatalog.Entry) {
            self.function = function
            self.generation = generation
            self.entry = entry
            let active = entry.record.release.activeVersions
            soleVersion = active.count == 1 ? active[0] : nil
            guarded = entry.invocationAuth != nil
        }
    }

    /// Per-loop routing cache: one dictionary lookup per request instead of copying the catalog entry and the
    /// version, while the catalog has not changed; and the function routed last, compared by name before that.
    private var routes: [String: CachedFunction] = [:]
    private var lastRoute: CachedFunction?

    /// Where a request for `function` goes: the pinned version, or one chosen by release weight. Nil when the
    /// catalog cannot route it (the NIO handler then answers with the reason).
    func target(function: String, pinnedVersion: Int?) -> Target? {
        let generation = catalog.changeCount
        let cached: CachedFunction
        if let last = lastRoute, last.generation == generation, last.function == function {
            cached = last
        } else if let hit = routes[function], hit.generation == generation {
            cached = hit
            lastRoute = hit
        } else {
            guard let entry = catalog.entry(function) else {
                routes[function] = nil
                return nil
            }
            if routes.count >= 4096 { routes.removeAll(keepingCapacity: true) }
            cached = CachedFunction(function: function, generation: generation, entry: entry)
            routes[function] = cached
            lastRoute = cached
        }
        if cached.guarded { return nil }
        let number: Int
        if let pinnedVersion {
            number = pinnedVersion
        } else if let sole = cached.soleVersion {
            number = sole
        } else {
            guard let picked = cached.entry.record.release.pickVersion(roll: splitRoll.next()) else { return nil }
            number = picked
        }
        if let last = cached.lastTarget, last.versionNumber == number { return last }
        let target: Target
        if let known = cached.pools[number] {
            target = known
        } else {
            guard let version = cached.entry.versions[number] else { return nil }
            target = Target(pool: reactor.shared.scheduler.pool(for: version))
            cached.pools[number] = target
        }
        cached.lastTarget = target
        return target
    }

    // MARK: instance connections

    /// One instance's idle kept-alive connections on this loop.
    private final class IdleUpstreams {
        let instanceID: String
        var connections: [ReactorUpstream] = []

        init(instanceID: String) {
            self.instanceID = instanceID
        }
    }

    /// The instance's idle list (made when `create`).
    private func idleList(_ instanceID: String, create: Bool) -> IdleUpstreams? {
        if let last = lastIdle, last.instanceID == instanceID { return last }
        let list: IdleUpstreams
        if let known = idleUpstreams[instanceID] {
            list = known
        } else {
            guard create else { return nil }
            list = IdleUpstreams(instanceID: instanceID)
            idleUpstreams[instanceID] = list
        }
        lastIdle = list
        return list
    }

    /// An idle kept-alive connection to the instance, or a new one (connecting).
    func upstream(instanceID: String, endpoint: InstanceEndpoint) -> ReactorUpstream? {
        if let list = idleList(instanceID, create: false) {
            while let idle = list.connections.popLast() {
                idle.inIdlePool = false
                if idle.isUsable { return idle }
                idle.close()
            }
        }
        guard let fd = SocketAddresses.connectInstance(endpoint) else { return nil }
        let upstream = ReactorUpstream(fd: fd, loop: self, instanceID: instanceID, endpoint: endpoint)
        register(upstream)
        return upstream
    }

    /// Keeps a connection for the next request to the same instance.
    func release(_ upstream: ReactorUpstream) {
        guard upstream.isUsable, !drainingSeen, let list = idleList(upstream.instanceID, create: true),
              list.connections.count < Self.maxIdlePerInstance else {
            upstream.close()
            return
        }
        upstream.inIdlePool = true
        list.connections.append(upstream)
    }

    /// An idle connection closed (the instance went away or timed it out).
    func removeIdle(_ upstream: ReactorUpstream) {
        guard upstream.inIdlePool else { return }
        upstream.inIdlePool = false
        guard let list = idleList(upstream.instanceID, create: false) else { return }
        list.connections.removeAll { $0 === upstream }
        if list.connections.isEmpty {
            idleUpstreams[upstream.instanceID] = nil
            if lastIdle === list { lastIdle = nil }
        }
    }

    private func closeEverything() {
        adoptInbox()
        for socket in sockets {
            guard let socket else { continue }
            if let client = socket as? ReactorClient {
                client.abort()
            } else if let upstream = socket as? ReactorUpstream {
                upstream.close()
            }
        }
        idleUpstreams.removeAll()
        lastIdle = nil
        lastRoute = nil
        Glibc.close(epollFD)
        Glibc.close(wakeFD)
    }
}
