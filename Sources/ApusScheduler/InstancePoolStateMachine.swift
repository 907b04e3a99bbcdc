import ApusCore

/// Decides, for one function version, which instance serves which request, when instances start and stop,
/// and when a request is refused. Pure: no I/O, no clock of its own; every input carries `now`.
public struct InstancePoolStateMachine: Sendable {
    public typealias Instant = ContinuousClock.Instant

    public struct Configuration: Sendable, Equatable {
        /// Requests one instance serves at once.
        public var concurrency: Int
        public var minInstances: Int
        public var maxInstances: Int
        /// Requests that may wait for a slot; more are refused as overloaded.
        public var queueLength: Int
        /// A ready instance above `minInstances` idle this long is stopped.
        public var idleTimeout: Duration
        /// CoDel-style shedding: when queued requests have waited longer than `target` for a whole `interval`,
        /// requests that would have to queue are refused at once. Nil: off.
        public var shedding: Shedding?
        /// With more ready instances than this, a request carrying a shard key (its gateway worker) goes to the
        /// `shardSize` instances the consistent-hash ring gives that key, and only spills to the others when all of
        /// those are busy. 0: no sharding.
        public var shardSize: Int

        public struct Shedding: Sendable, Equatable {
            public var target: Duration
            public var interval: Duration

            public init(target: Duration, interval: Duration) {
                self.target = target
                self.interval = interval
            }
        }

        public init(concurrency: Int, minInstances: Int, maxInstances: Int, queueLength: Int, idleTimeout: Duration,
                    shedding: Shedding? = nil, shardSize: Int = 0) {
            self.concurrency = concurrency
            self.minInstances = minInstances
            self.maxInstances = maxInstances
            self.queueLength = queueLength
            self.idleTimeout = idleTimeout
            self.shedding = shedding
            self.shardSize = shardSize
        }
    }

    public enum InstanceState: String, Sendable {
        case starting
        case ready
        /// Takes no new work; stopped once its in-flight requests finish.
        case draining
    }

    public struct Instance: Sendable {
        public var id: String
        public var state: InstanceState
        public var inFlight: Int
        public var lastActive: Instant
        public var startedAt: Instant
        public var readyAt: Instant?
        /// Where the instance listens, once ready (leases carry it).
        public var endpoint: InstanceEndpoint?
    }

    /// After a failed start the next start waits (requests stay queued meanwhile): 0.5 s, doubling per consecutive
    /// failure, at most this long.
    public static let maxStartBackoff: Duration = .seconds(30)
    /// An instance that dies sooner than this after becoming ready counts as a failed start (crash loop).
    public static let crashLoopWindow: Duration = .seconds(2)

    public enum Action: Sendable, Equatable {
        /// Hand the waiting request a slot on this instance.
        case dispatch(requestID: String, instanceID: String)
        /// Fail the waiting request.
        case fail(requestID: String, ApusError)
        /// Launch a new instance with this id; report `instanceReady` or `instanceFailedToStart`.
        case startInstance(instanceID: String)
        /// Stop this instance (SIGTERM, then SIGKILL); it is already forgotten by the machine.
        case stopInstance(instanceID: String)
    }

    private struct Waiter {
        var requestID: String
        var deadline: Instant
        var enqueuedAt: Instant
    }

    /// Smoothed time a request holds its slot, from release reports: an exponentially weighted average over
    /// tick windows (0.8 × the average + 0.2 × the window's mean), with the current window counted in as if it had
    /// just ended; nil until the first report.
    public var averageServiceTime: Duration? {
        guard windowServiceCount > 0 else { return smoothedServiceTime }
        let mean = windowServiceTotal / windowServiceCount
        guard let smoothed = smoothedServiceTime else { return mean }
        return (smoothed * 4 + mean) / 5
    }
    private var smoothedServiceTime: Duration?
    /// Service times reported since the last tick. Kept as a sum and a count because a release only adds (this
    /// runs for every request; multiplying and dividing durations is 128-bit arithmetic).
    private var windowServiceTotal = Duration.zero
    private var windowServiceCount = 0
    /// CoDel state: when the queue delay first stayed above target, plus the interval; and whether shedding is on.
    private var aboveTargetUntil: Instant?
    public private(set) var isShedding = false

    public private(set) var configuration: Configuration
    public private(set) var instances: [String: Instance] = [:]
    private var waiters: [Waiter] = []
    /// Once closed (version retired or shutting down) nothing new is started or admitted.
    public private(set) var isClosed = false
    /// The autoscaler's wish: at least this many instances (bounded by `maxInstances`); 0 leaves scaling to demand.
    public private(set) var desiredInstances = 0
    /// Requests admitted since `takeAdmitted()` was last called (the autoscaler's request rate).
    private var admitted = 0
    private var consecutiveStartFailures = 0
    private var startBlockedUntil: Instant?
    private let makeInstanceID: @Sendable () -> String
    /// Bumped whenever the set of ready instances may have changed; the caches below are rebuilt lazily from it.
    private var membershipGeneration = 0
    private var readyCache: (generation: Int, ids: [String]) = (-1, [])
    private var ringCache: (generation: Int, ring: ConsistentHashRing?) = (-1, nil)
    private var shardCache: [UInt64: [String]] = [:]
    private var random = SplitMix64(seed: 0x5EED_0F_A9A5)

    public init(configuration: Configuration, makeInstanceID: @escaping @Sendable () -> String = { Identifier.make(prefix: "i-", length: 8) }) {
        self.configuration = configuration
        self.makeInstanceID = makeInstanceID
    }

    public var queueDepth: Int { waiters.count }
    public var readyCount: Int { instances.values.filter { $0.state == .ready }.count }

    /// The number of instances kept whatever the demand: `scale.min`, or more while the autoscaler asks for more.
    var instanceFloor: Int { min(configuration.maxInstances, max(configuration.minInstances, desiredInstances)) }

    /// Requests admitted since the last call.
    public mutating func takeAdmitted() -> Int {
        defer { admitted = 0 }
        return admitted
    }
    public var inFlight: Int { instances.values.reduce(0) { $0 + $1.inFlight } }

    // MARK: inputs

    /// A request wants a slot.
    public mutating func request(_ requestID: String, deadline: Instant, now: Instant, shard: UInt64? = nil) -> [Action] {
        if isClosed {
            return [.fail(requestID: requestID, ApusError(.unavailable, "this version is no longer served"))]
        }
        if deadline <= now {
            return [.fail(requestID: requestID, ApusError(.deadlineExceeded, "deadline passed before the request was queued"))]
        }
        admitted += 1
        if waiters.isEmpty, let instanceID = pickInstance(shard: shard) {
            instances[instanceID]!.inFlight += 1
            instances[instanceID]!.lastActive = now
            return [.dispatch(requestID: requestID, instanceID: instanceID)]
        }
        guard waiters.count < configuration.queueLength else {
            return [.fail(requestID: requestID, ApusError(.overloaded, "queue full (\(configuration.queueLength) waiting); retry later"))]
        }
        if isShedding {
            return [.fail(requestID: requestID, ApusError(.overloaded, "queue delay has stayed above its target; shedding load, retry later"))]
        }
        if let done = expectedCompletion(position: waiters.count), now.advanced(by: done) > deadline {
            return [.fail(requestID: requestID, ApusError(.overloaded, "cannot be served before its deadline: it would finish in about \(done.milliseconds)ms; retry later"))]
        }
        waiters.append(Waiter(requestID: requestID, deadline: deadline, enqueuedAt: now))
        return scaleUpForQueue(now: now)
    }

    /// The hot path of `request`: takes a free slot when nobody is queued, without building actions.
    /// Returns nil when the request has to go through `request` (no free slot, queue not empty, closed).
    public mutating func takeFreeSlot(now: Instant, shard: UInt64? = nil) -> String? {
        takeFreeSlotAndEndpoint(now: now, shard: shard)?.instanceID
    }

    /// `takeFreeSlot` with the instance's endpoint (nil if `instanceReady` was not told it).
    public mutating func takeFreeSlotAndEndpoint(now: Instant, shard: UInt64? = nil) -> (instanceID: String, endpoint: InstanceEndpoint?)? {
        guard !isClosed, waiters.isEmpty, let index = pickInstanceIndex(shard: shard) else { return nil }
        admitted += 1
        // Through the index: one hash of the id for the updates and the reads (this runs for every request).
        instances.values[index].inFlight += 1
        instances.values[index].lastActive = now
        let instance = instances.values[index]
        return (instance.id, instance.endpoint)
    }

    /// A dispatched request finished with its slot after holding it `serviceTime` (feeds the queue-wait estimate).
    public mutating func release(instanceID: String, serviceTime: Duration, now: Instant) -> [Action] {
        windowServiceTotal += serviceTime
        windowServiceCount += 1
        return release(instanceID: instanceID, now: now)
    }

    /// A dispatched request finished with its slot.
    public mutating func release(instanceID: String, now: Instant) -> [Action] {
        guard let index = instances.index(forKey: instanceID) else { return [] }
        instances.values[index].inFlight = max(0, instances.values[index].inFlight - 1)
        instances.values[index].lastActive = now
        if instances.values[index].state == .draining {
            if instances.values[index].inFlight == 0 {
                instances.remove(at: index)
                membershipGeneration += 1
                return [.stopInstance(instanceID: instanceID)]
            }
            return []
        }
        return dispatchWaiters(now: now)
    }

    public mutating func instanceReady(_ instanceID: String, now: Instant, endpoint: InstanceEndpoint? = nil) -> [Action] {
        guard var instance = instances[instanceID] else {
            // Forgotten while starting (closed or scaled down): stop it.
            return [.stopInstance(instanceID: instanceID)]
        }
        guard instance.state == .starting else { return [] }
        instance.state = .ready
        instance.lastActive = now
        instance.readyAt = now
        instance.endpoint = endpoint
        instances[instanceID] = instance
        membershipGeneration += 1
        consecutiveStartFailures = 0
        startBlockedUntil = nil
        return dispatchWaiters(now: now)
    }

    public mutating func instanceFailedToStart(_ instanceID: String, error: ApusError, now: Instant) -> [Action] {
        guard instances.removeValue(forKey: instanceID) != nil else { return [] }
        membershipGeneration += 1
        noteStartFailure(error, now: now)
        // Without any other instance on the way, waiting requests would wait in vain: fail them now.
        if !instances.values.contains(where: { $0.state != .draining }) {
            let failed = waiters.map { Action.fail(requestID: $0.requestID, error) }
            waiters.removeAll()
            return failed
        }
        return scaleUpForQueue(now: now)
    }

    /// The instance's process ended without being asked to (crash, exit). Its in-flight requests fail on their own
    /// connections; it is replaced when there is demand or `minInstances` requires it.
    public mutating func instanceExited(_ instanceID: String, now: Instant) -> [Action] {
        guard let instance = instances.removeValue(forKey: instanceID) else { return [] }
        membershipGeneration += 1
        guard !isClosed else { return [] }
        if let readyAt = instance.readyAt, now - readyAt < Self.crashLoopWindow {
            noteStartFailure(ApusError(.unavailable, "instance exited \((now - readyAt).milliseconds)ms after becoming ready"), now: now)
        } else if instance.readyAt == nil {
            noteStartFailure(ApusError(.unavailable, "instance exited before it was ready"), now: now)
        }
        return scaleUpForQueue(now: now) + ensureMinimum(now: now)
    }

    /// Nobody could connect to the instance although it counts as ready: its process died or stopped listening and
    /// its exit has not been seen yet. It takes no more work and is stopped; for replacement and crash-loop
    /// accounting this counts as an exit.
    public mutating func instanceUnreachable(_ instanceID: String, now: Instant) -> [Action] {
        guard instances[instanceID] != nil else { return [] }
        return [.stopInstance(instanceID: instanceID)] + instanceExited(instanceID, now: now)
    }

    /// Every queued request whose deadline passed by `now` fails.
    public mutating func expireWaiters(now: Instant) -> [Action] {
        var actions: [Action] = []
        waiters.removeAll { waiter in
            guard waiter.deadline <= now else { return false }
            actions.append(.fail(requestID: waiter.requestID, ApusError(.deadlineExceeded, "no instance slot before the deadline")))
            return true
        }
        return actions
    }

    /// The earliest deadline of a queued request: when the pool's queue timer must fire next.
    public var earliestWaiterDeadline: Instant? {
        waiters.lazy.map(\.deadline).min()
    }

    /// The caller went away while queued.
    public mutating func requestCancelled(_ requestID: String) {
        waiters.removeAll { $0.requestID == requestID }
    }

    /// Periodic housekeeping: expire overdue waiters, stop idle instances above the minimum, keep the minimum.
    public mutating func tick(now: Instant) -> [Action] {
        var actions: [Action] = []
        if windowServiceCount > 0 {
            smoothedServiceTime = averageServiceTime
            windowServiceTotal = .zero
            windowServiceCount = 0
        }
        if waiters.isEmpty {
            aboveTargetUntil = nil
            isShedding = false
        }
        let overdue = waiters.filter { $0.deadline <= now }
        if !overdue.isEmpty {
            waiters.removeAll { $0.deadline <= now }
            actions += overdue.map { .fail(requestID: $0.requestID, ApusError(.deadlineExceeded, "no instance slot before the deadline")) }
        }
        guard !isClosed else { return actions }
        var serving = instances.values.filter { $0.state != .draining }.count
        let idle = instances.values
            .filter { $0.state == .ready && $0.inFlight == 0 && now - $0.lastActive >= configuration.idleTimeout }
            .sorted { $0.lastActive < $1.lastActive }
        for instance in idle where serving > instanceFloor && waiters.isEmpty {
            instances[instance.id] = nil
            membershipGeneration += 1
            serving -= 1
            actions.append(.stopInstance(instanceID: instance.id))
        }
        return actions + ensureMinimum(now: now) + scaleUpForQueue(now: now)
    }

    /// New limits (a redeploy of the same version cannot happen; this is for `scale`/queue changes at runtime).
    public mutating func reconfigure(_ configuration: Configuration, now: Instant) -> [Action] {
        self.configuration = configuration
        return ensureMinimum(now: now) + dispatchWaiters(now: now)
    }

    /// The autoscaler's decision: keep at least `count` instances (starting them now if needed).
    public mutating func setDesired(_ count: Int, now: Instant) -> [Action] {
        desiredInstances = max(0, count)
        return ensureMinimum(now: now)
    }

    /// Makes sure `scale.min` (or the autoscaler's larger wish) instances exist.
    public mutating func ensureMinimum(now: Instant) -> [Action] {
        guard !isClosed, !isStartBlocked(now: now) else { return [] }
        var actions: [Action] = []
        var serving = instances.values.filter { $0.state != .draining }.count
        while serving < instanceFloor {
            actions.append(startInstance(now: now))
            serving += 1
        }
        return actions
    }

    /// Retires the pool: waiting requests fail, idle instances stop now, busy ones when their requests finish.
    public mutating func close(reason: ApusError) -> [Action] {
        isClosed = true
        var actions = waiters.map { Action.fail(requestID: $0.requestID, reason) }
        waiters.removeAll()
        for (id, instance) in instances {
            if instance.inFlight == 0 || instance.state == .starting {
                instances[id] = nil
                actions.append(.stopInstance(instanceID: id))
            } else {
                instances[id]!.state = .draining
            }
            membershipGeneration += 1
        }
        return actions
    }

    // MARK: internals

    /// Above this many candidates the least-loaded choice samples two at random (power of two choices) instead of
    /// scanning them all.
    static let powerOfTwoThreshold = 16

    /// The instance for the next request: among the shard's instances when sharding applies (spilling to all ready
    /// instances when those are busy), the least loaded with a free slot; nil when every slot is taken.
    private mutating func pickInstance(shard: UInt64?) -> String? {
        pickInstanceIndex(shard: shard).map { instances.keys[$0] }
    }

    /// `pickInstance`, as the instance's position in `instances` (valid until `instances` changes).
    private mutating func pickInstanceIndex(shard: UInt64?) -> Dictionary<String, Instance>.Index? {
        let ready = readyInstanceIDs()
        if let shard, configuration.shardSize > 0, ready.count > configuration.shardSize,
           let index = leastLoaded(among: shardMembers(shard)) {
            return index
        }
        return leastLoaded(among: ready)
    }

    /// Ready instance ids in a stable order, rebuilt only when membership changed.
    private mutating func readyInstanceIDs() -> [String] {
        if readyCache.generation != membershipGeneration {
            readyCache = (membershipGeneration, instances.values.filter { $0.state == .ready }.map(\.id).sorted())
        }
        return readyCache.ids
    }

    /// The `shardSize` ready instances the ring assigns to `shard`.
    private mutating func shardMembers(_ shard: UInt64) -> [String] {
        if ringCache.generation != membershipGeneration {
            ringCache = (membershipGeneration, ConsistentHashRing(members: readyInstanceIDs()))
            shardCache.removeAll(keepingCapacity: true)
        }
        if let members = shardCache[shard] { return members }
        let members = ringCache.ring?.members(forKey: shard, count: configuration.shardSize) ?? []
        shardCache[shard] = members
        return members
    }

    /// The id's instance if it is ready with a free slot: its position and its load.
    private func freeSlot(_ id: String) -> (index: Dictionary<String, Instance>.Index, load: Int)? {
        guard let index = instances.index(forKey: id) else { return nil }
        let instance = instances.values[index]
        guard instance.state == .ready, instance.inFlight < configuration.concurrency else { return nil }
        return (index, instance.inFlight)
    }

    /// Least outstanding requests among `ids`: every candidate when there are few, else the better of two random
    /// ones (falling back to a full scan when both are full).
    private mutating func leastLoaded(among ids: [String]) -> Dictionary<String, Instance>.Index? {
        if ids.count > Self.powerOfTwoThreshold {
            let first = random.next(below: ids.count)
            var second = random.next(below: ids.count - 1)
            if second >= first { second += 1 }
            switch (freeSlot(ids[first]), freeSlot(ids[second])) {
            case (let a?, let b?): return a.load <= b.load ? a.index : b.index
            case (let a?, nil): return a.index
            case (nil, let b?): return b.index
            case (nil, nil): break
            }
        }
        var best: (index: Dictionary<String, Instance>.Index, load: Int)?
        for id in ids {
            guard let candidate = freeSlot(id) else { continue }
            if best == nil || candidate.load < best!.load { best = candidate }
        }
        return best?.index
    }

    private mutating func dispatchWaiters(now: Instant) -> [Action] {
        var actions: [Action] = []
        while !waiters.isEmpty, let instanceID = pickInstance(shard: nil) {
            let waiter = waiters.removeFirst()
            noteQueueDelay(now - waiter.enqueuedAt, now: now)
            if waiter.deadline <= now {
                actions.append(.fail(requestID: waiter.requestID, ApusError(.deadlineExceeded, "no instance slot before the deadline")))
                continue
            }
            instances[instanceID]!.inFlight += 1
            instances[instanceID]!.lastActive = now
            actions.append(.dispatch(requestID: waiter.requestID, instanceID: instanceID))
        }
        return actions
    }

    /// Starts instances while the queue exceeds what starting instances will absorb, up to `maxInstances`.
    private mutating func scaleUpForQueue(now: Instant) -> [Action] {
        guard !isClosed, !isStartBlocked(now: now) else { return [] }
        var actions: [Action] = []
        var serving = instances.values.filter { $0.state != .draining }.count
        var startingCapacity = instances.values.filter { $0.state == .starting }.count * configuration.concurrency
        while waiters.count > startingCapacity, serving < configuration.maxInstances {
            actions.append(startInstance(now: now))
            serving += 1
            startingCapacity += configuration.concurrency
        }
        return actions
    }

    /// How soon a request queued at `position` can expect to be done at best: the requests in the slots and ahead
    /// of it, spread over the slots of `scale.max` instances (the queue makes the pool scale out), each holding a
    /// slot for the average service time, then its own. Nil while nothing is known (no ready instance — a cold
    /// start is waited for, not shed — or no service time yet).
    public func expectedCompletion(position: Int) -> Duration? {
        guard let average = averageServiceTime, readyCount > 0 else { return nil }
        let slots = max(readyCount, configuration.maxInstances) * configuration.concurrency
        return average * Double(position / slots + 2)
    }

    /// CoDel: shedding starts when every queue delay seen for a whole interval was above target, and stops at the
    /// first delay below it (or when the queue empties).
    private mutating func noteQueueDelay(_ delay: Duration, now: Instant) {
        guard let shedding = configuration.shedding else { return }
        if delay < shedding.target {
            aboveTargetUntil = nil
            isShedding = false
        } else if let until = aboveTargetUntil {
            if now >= until { isShedding = true }
        } else {
            aboveTargetUntil = now.advanced(by: shedding.interval)
        }
    }

    private func isStartBlocked(now: Instant) -> Bool {
        startBlockedUntil.map { now < $0 } ?? false
    }

    private mutating func noteStartFailure(_ error: ApusError, now: Instant) {
        consecutiveStartFailures += 1
        let exponent = min(consecutiveStartFailures - 1, 10)
        let backoff = min(Duration.milliseconds(500) * (1 << exponent), Self.maxStartBackoff)
        startBlockedUntil = now.advanced(by: backoff)
    }

    private mutating func startInstance(now: Instant) -> Action {
        let id = makeInstanceID()
        instances[id] = Instance(id: id, state: .starting, inFlight: 0, lastActive: now, startedAt: now, readyAt: nil)
        return .startInstance(instanceID: id)
    }
}
