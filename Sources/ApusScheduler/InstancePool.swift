import ApusCore
import ApusRuntime
import Foundation
import Logging
import Synchronization

/// One function version's instances and waiting requests. Wraps `InstancePoolStateMachine` and carries out its
/// actions: launching and stopping instances, resuming requests with a slot or an error.
public final class InstancePool: Sendable {
    /// A slot on one instance, held for one request. Give it back with `release(_:)`.
    public struct Lease: Sendable {
        public let instanceID: String
        /// Where the instance serves (loopback, or its address in its own network namespace).
        public let endpoint: InstanceEndpoint
        /// When the slot was handed out (service time is measured from here).
        public let since: ContinuousClock.Instant

        public var port: Int { endpoint.port }

        init(instanceID: String, endpoint: InstanceEndpoint, since: ContinuousClock.Instant) {
            self.instanceID = instanceID
            self.endpoint = endpoint
            self.since = since
        }
    }

    public struct InstanceInfo: Sendable, Codable {
        public var id: String
        public var version: Int
        public var state: String
        public var port: Int?
        /// The instance's IPv4 address: 127.0.0.1, or its address in its own network namespace.
        public var address: String?
        public var pid: Int32?
        public var inFlight: Int
        public var startedAt: Date
        public var ageSeconds: Double
    }

    private struct State {
        var machine: InstancePoolStateMachine
        var waiting: [String: any SlotWaiter] = [:]
        /// The one timer for the queue: armed for the earliest deadline of a queued request (a generation tells
        /// a current timer from one replaced while it fired).
        var queueTimer: (deadline: ContinuousClock.Instant, generation: UInt64, timer: ClockTimer)?
        var queueTimerGeneration: UInt64 = 0
        var handles: [String: any InstanceHandle] = [:]
        var launching = 0
        var stopping = 0
        var lastDecision: KPAScaler.Decision?
        var score = ScalerScore()
    }

    public let version: FunctionVersion
    /// This version's request, queue, instance and scaler metrics.
    public let metrics: VersionMetrics
    private let state: Mutex<State>
    private let launcher: any InstanceLauncher
    private let codeDirectory: @Sendable (FunctionVersion) throws(ApusError) -> URL
    private let stopGrace: Duration
    private let logger: Logger
    /// Where "now" and the queue's timer come from (`SystemClock`; a `ManualClock` in unit tests).
    let clock: any SchedulingClock

    init(
        version: FunctionVersion, configuration: InstancePoolStateMachine.Configuration,
        launcher: any InstanceLauncher, codeDirectory: @escaping @Sendable (FunctionVersion) throws(ApusError) -> URL,
        stopGrace: Duration, logger: Logger, clock: any SchedulingClock = SystemClock()
    ) {
        self.clock = clock
        self.version = version
        self.metrics = VersionMetrics(function: version.function, version: version.number)
        self.state = Mutex(State(machine: InstancePoolStateMachine(configuration: configuration)))
        self.launcher = launcher
        self.codeDirectory = codeDirectory
        self.stopGrace = stopGrace
        var logger = logger
        logger[metadataKey: "function"] = "\(version.function)"
        logger[metadataKey: "version"] = "\(version.number)"
        self.logger = logger
    }

    private var now: ContinuousClock.Instant { clock.now }

    /// What `acquire(requestID:deadline:waiter:)` decided on the spot.
    public enum AcquireOutcome: Sendable {
        /// A slot was free: use it now.
        case leased(Lease)
        /// Refused at once (queue full, deadline passed, pool closed).
        case failed(ApusError)
        /// Waiting for a slot; the waiter hears once, with the lease or the failure.
        case queued
    }

    /// Takes a slot without waiting when one is free (the hot path: no task, no continuation, no allocation);
    /// otherwise queues the request until `deadline` and tells `waiter`, from any thread.
    public func acquire(requestID: String, deadline: ContinuousClock.Instant, waiter: any SlotWaiter, shard: UInt64? = nil) -> AcquireOutcome {
        var outcome = AcquireOutcome.queued
        let actions = state.withLock { state -> [InstancePoolStateMachine.Action] in
            let now = self.now
            if let lease = Self.takeFreeLease(&state, now: now, shard: shard) {
                outcome = .leased(lease)
                return []
            }
            var rest: [InstancePoolStateMachine.Action] = []
            for action in state.machine.request(requestID, deadline: deadline, now: now, shard: shard) {
                switch action {
                case .dispatch(let id, let instanceID) where id == requestID:
                    // A ready instance always has its handle: both change under this lock.
                    outcome = .leased(Lease(instanceID: instanceID, endpoint: state.handles[instanceID]!.endpoint, since: now))
                case .fail(let id, let error) where id == requestID:
                    metrics.recordRejection(error.code.name)
                    outcome = .failed(error)
                default:
                    rest.append(action)
                }
            }
            if case .queued = outcome {
                state.waiting[requestID] = waiter
                armQueueTimer(&state, for: deadline)
            }
            return rest
        }
        perform(actions)
        return outcome
    }

    /// Takes a slot only when one is free right now and nobody is queued; never queues, starts nothing and
    /// records nothing. Callers that get nil go through `acquire(requestID:deadline:waiter:shard:)`.
    public func tryAcquire(shard: UInt64? = nil) -> Lease? {
        tryAcquire(shard: shard, now: now)
    }

    /// `tryAcquire(shard:)` at `now` (a caller that read the clock already, such as a reactor loop once per
    /// pass of its events).
    public func tryAcquire(shard: UInt64?, now: ContinuousClock.Instant) -> Lease? {
        state.withLock { Self.takeFreeLease(&$0, now: now, shard: shard) }
    }

    /// A free slot right now as a lease (nobody queued); the endpoint comes with the slot from the state machine.
    private static func takeFreeLease(_ state: inout State, now: ContinuousClock.Instant, shard: UInt64?) -> Lease? {
        guard let (instanceID, endpoint) = state.machine.takeFreeSlotAndEndpoint(now: now, shard: shard),
              let endpoint = endpoint ?? state.handles[instanceID]?.endpoint else {
            return nil
        }
        return Lease(instanceID: instanceID, endpoint: endpoint, since: now)
    }

    /// Makes sure the queue's timer fires by `deadline`: one timer per pool, re-armed only for an earlier deadline
    /// (requests of one version mostly share a timeout, so a burst of queued requests arms it once).
    private func armQueueTimer(_ state: inout State, for deadline: ContinuousClock.Instant) {
        if let armed = state.queueTimer, armed.deadline <= deadline { return }
        state.queueTimer?.timer.cancel()
        state.queueTimerGeneration &+= 1
        let generation = state.queueTimerGeneration
        // Strong, not weak: a weak reference would give the pool a side table, which makes every retain and
        // release of it slower, and the gateway retains pools per request. The timer ends at its deadline.
        let timer = clock.schedule(at: deadline) { self.queueTimerFired(generation: generation) }
        state.queueTimer = (deadline, generation, timer)
    }

    /// Fails every queued request whose deadline passed and arms the timer for the next deadline.
    private func queueTimerFired(generation: UInt64) {
        let actions = state.withLock { state -> [InstancePoolStateMachine.Action] in
            guard state.queueTimer?.generation == generation else { return [] }  // replaced meanwhile
            state.queueTimer = nil
            let actions = state.machine.expireWaiters(now: now)
            if let next = state.machine.earliestWaiterDeadline { armQueueTimer(&state, for: next) }
            return actions
        }
        perform(actions)
    }

    /// The caller of a queued request went away. Returns false when the decision was already made (its callback
    /// is on its way, and a lease it carries must be released).
    @discardableResult
    public func cancel(requestID: String) -> Bool {
        state.withLock { state in
            state.machine.requestCancelled(requestID)
            return state.waiting.removeValue(forKey: requestID) != nil
        }
    }

    /// Waits for a slot on a ready instance (starting one if needed) until `deadline`.
    public func acquire(requestID: String, deadline: ContinuousClock.Instant) async throws(ApusError) -> Lease {
        let result = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<Lease, ApusError>, Never>) in
                switch acquire(requestID: requestID, deadline: deadline, waiter: ContinuationWaiter(continuation)) {
                case .leased(let lease): continuation.resume(returning: .success(lease))
                case .failed(let error): continuation.resume(returning: .failure(error))
                case .queued: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiting[requestID] }
            cancel(requestID: requestID)
            waiter?.slotDecided(requestID: requestID, .failure(ApusError(.unavailable, "request cancelled by the caller")))
        }
        return try result.get()
    }

    public func release(_ lease: Lease) {
        release(lease, now: now)
    }

    /// `release(_:)` at `now`, read by the caller.
    public func release(_ lease: Lease, now: ContinuousClock.Instant) {
        perform(state.withLock { $0.machine.release(instanceID: lease.instanceID, serviceTime: now - lease.since, now: now) })
    }

    /// The lease's instance could not be reached: it is taken out of service (and stopped) at once, so the caller
    /// can ask for another slot. The lease needs no release afterwards.
    public func reportUnreachable(_ lease: Lease) {
        logger.warning("instance unreachable, taken out of service", metadata: ["instance": "\(lease.instanceID)"])
        perform(state.withLock { $0.machine.instanceUnreachable(lease.instanceID, now: now) })
    }

    /// Takes the instance out of service when it is one of this pool's (its failure is known); false when not.
    func takeOutOfService(instanceID: String) -> Bool {
        let actions = state.withLock { state -> [InstancePoolStateMachine.Action]? in
            guard state.machine.instances[instanceID] != nil else { return nil }
            return state.machine.instanceUnreachable(instanceID, now: now)
        }
        guard let actions else { return false }
        logger.warning("instance failed, taken out of service", metadata: ["instance": "\(instanceID)"])
        perform(actions)
        return true
    }

    func tick() {
        perform(state.withLock { $0.machine.tick(now: now) })
        refreshGauges()
    }

    /// Sets the queue, in-flight and instance gauges from the pool's current state.
    func refreshGauges() {
        let (queued, inFlight, byState) = state.withLock { state in
            var byState: [InstancePoolStateMachine.InstanceState: Int] = [:]
            for instance in state.machine.instances.values { byState[instance.state, default: 0] += 1 }
            return (state.machine.queueDepth, state.machine.inFlight, byState)
        }
        metrics.recordLoad(queued: queued, inFlight: inFlight, instancesByState: byState)
    }

    func reconfigure(_ configuration: InstancePoolStateMachine.Configuration) {
        perform(state.withLock { state in
            state.machine.configuration == configuration ? [] : state.machine.reconfigure(configuration, now: now)
        })
    }

    /// What the autoscaler samples each second.
    struct Load {
        var inFlight: Int
        var queued: Int
        var ready: Int
        var admitted: Int
    }

    func sampleLoad() -> Load {
        state.withLock { state in
            Load(inFlight: state.machine.inFlight, queued: state.machine.queueDepth, ready: state.machine.readyCount,
                 admitted: state.machine.takeAdmitted())
        }
    }

    /// Applies the autoscaler's decision (and keeps it for status displays).
    func apply(_ decision: KPAScaler.Decision) {
        perform(state.withLock { state in
            metrics.recordDecision(desired: decision.desired, previous: state.lastDecision?.desired, panicking: decision.panicking)
            state.lastDecision = decision
            return state.machine.desiredInstances == decision.desired ? [] : state.machine.setDesired(decision.desired, now: now)
        })
    }

    /// The autoscaler's latest decision for this version, if it made one.
    public var lastDecision: KPAScaler.Decision? {
        state.withLock { $0.lastDecision }
    }

    /// How the autoscaler's decisions turned out, second by second.
    public var score: ScalerScore {
        state.withLock { $0.score }
    }

    func recordScore(_ load: Load) {
        state.withLock { $0.score.record(load, concurrency: $0.machine.configuration.concurrency) }
    }

    func ensureMinimum() {
        perform(state.withLock { $0.machine.ensureMinimum(now: now) })
    }

    var configuration: InstancePoolStateMachine.Configuration {
        state.withLock { $0.machine.configuration }
    }

    /// Refuses new work, stops every instance and returns once all are gone.
    func close(reason: ApusError) async {
        perform(state.withLock { $0.machine.close(reason: reason) })
        while state.withLock({ $0.launching > 0 || $0.stopping > 0 || !$0.machine.instances.isEmpty }) {
            try? await Task.sleep(for: .milliseconds(20))
        }
        metrics.destroy()
    }

    public func instances() -> [InstanceInfo] {
        state.withLock { state in
            let now = self.now
            return state.machine.instances.values.sorted { $0.startedAt < $1.startedAt }.map { instance in
                let handle = state.handles[instance.id]
                return InstanceInfo(
                    id: instance.id, version: version.number, state: instance.state.rawValue,
                    port: handle?.port, address: handle?.endpoint.host, pid: handle?.pid, inFlight: instance.inFlight,
                    startedAt: Date(timeIntervalSinceNow: -(now - instance.startedAt).seconds),
                    ageSeconds: (now - instance.startedAt).seconds)
            }
        }
    }

    public var queueDepth: Int { state.withLock { $0.machine.queueDepth } }

    // MARK: carrying out actions

    private func perform(_ actions: [InstancePoolStateMachine.Action]) {
        for action in actions {
            switch action {
            case .dispatch(let requestID, let instanceID):
                let (continuation, endpoint) = state.withLock { state in
                    (state.waiting.removeValue(forKey: requestID), state.handles[instanceID]?.endpoint)
                }
                guard let continuation, let endpoint else {
                    // The caller left meanwhile (or the instance vanished): hand the slot back.
                    perform(state.withLock { $0.machine.release(instanceID: instanceID, now: now) })
                    continuation?.slotDecided(requestID: requestID, .failure(ApusError(.instanceError, "instance \(instanceID) is gone")))
                    continue
                }
                continuation.slotDecided(requestID: requestID, .success(Lease(instanceID: instanceID, endpoint: endpoint, since: now)))

            case .fail(let requestID, let error):
                let continuation = state.withLock { $0.waiting.removeValue(forKey: requestID) }
                metrics.recordRejection(error.code.name)
                continuation?.slotDecided(requestID: requestID, .failure(error))

            case .startInstance(let instanceID):
                start(instanceID)

            case .stopInstance(let instanceID):
                let handle = state.withLock { state -> (any InstanceHandle)? in
                    guard let handle = state.handles.removeValue(forKey: instanceID) else { return nil }
                    state.stopping += 1
                    return handle
                }
                guard let handle else { continue }
                let grace = stopGrace
                Task {
                    await handle.stop(grace: grace)
                    self.state.withLock { $0.stopping -= 1 }
                }
                logger.info("instance stopping", metadata: ["instance": "\(instanceID)"])
            }
        }
    }

    private func start(_ instanceID: String) {
        state.withLock { $0.launching += 1 }
        logger.info("instance starting", metadata: ["instance": "\(instanceID)"])
        Task {
            let actions: [InstancePoolStateMachine.Action]
            do throws(ApusError) {
                let directory = try codeDirectory(version)
                let spec = InstanceSpec(instanceID: instanceID, version: version, codeDirectory: directory)
                // Strong, not weak (see the queue timer in `acquire`): the instance is this pool's, it is stopped
                // when the pool closes, and the launcher lets go of this handler once the process has exited.
                let handle = try await launcher.launch(spec) { exit in
                    let actions = self.state.withLock { state in
                        state.handles[instanceID] = nil
                        return state.machine.instanceExited(instanceID, now: self.now)
                    }
                    self.perform(actions)
                }
                actions = state.withLock { state in
                    state.launching -= 1
                    state.handles[instanceID] = handle
                    return state.machine.instanceReady(instanceID, now: now, endpoint: handle.endpoint)
                }
            } catch {
                actions = state.withLock { state in
                    state.launching -= 1
                    return state.machine.instanceFailedToStart(instanceID, error: error, now: now)
                }
            }
            perform(actions)
        }
    }
}

/// Hears the decision for a queued request: a lease, or why there is none. Called once, from any thread.
public protocol SlotWaiter: AnyObject, Sendable {
    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>)
}

/// Bridges a queued request to `async` callers.
private final class ContinuationWaiter: SlotWaiter {
    let continuation: CheckedContinuation<Result<InstancePool.Lease, ApusError>, Never>

    init(_ continuation: CheckedContinuation<Result<InstancePool.Lease, ApusError>, Never>) {
        self.continuation = continuation
    }

    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
        continuation.resume(returning: result)
    }
}
