import ApusCore
import ApusScheduler
import Foundation
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// The asynchronous task manager: accepts submissions (it is the gateway's and the API's `AsyncTaskSubmitter`),
/// keeps them in `TaskStore`, and runs `TaskStateMachine`'s decisions — attempts dispatched through the scheduler's
/// instance pools (a slot per running task, within the function's own `async.concurrency` budget), timeouts,
/// heartbeats, retries, cancellation, callbacks, retention. A swift-service-lifecycle `Service`: on graceful
/// shutdown it stops dispatching and interrupts running attempts, which stay recorded as running and run again after
/// the next start (as after a crash: at least once, with the attempt number counting up).
public final class TaskManager: Service, AsyncTaskSubmitter {
    public struct Configuration: Sendable {
        /// Largest payload a task may carry.
        public var maxPayloadBytes: Int
        /// Largest result kept; a larger one fails the task.
        public var resultLimit: Int
        /// Finished tasks are deleted this long after they finished.
        public var retention: Duration
        /// How long a running task asked to cancel gets to stop by itself before its invocation is torn down and
        /// its instance replaced.
        public var cancelGrace: Duration
        /// How long an attempt may wait for an instance slot before it counts as throttled.
        public var slotWait: Duration
        /// How often timeouts, heartbeats, backoffs and expiry are checked.
        public var tickInterval: Duration
        /// Callback deliveries: attempts and the first delay between them (doubling).
        public var callbackAttempts: Int
        public var callbackBackoff: Duration
        /// Where callbacks may go (by default not to this node: loopback, link-local, its own addresses).
        public var callbackPolicy = CallbackPolicy()
        /// The capability added to each task's progress URL (`?capability=`), which lets the function post that
        /// task's progress and call nothing else on the API; nil: none (the route then needs a token).
        public var progressCapability: (@Sendable (_ taskID: String) -> String)?

        public init(maxPayloadBytes: Int = 6 << 20, resultLimit: Int = 1 << 20, retention: Duration = .seconds(7 * 86_400),
                    cancelGrace: Duration = .seconds(5), slotWait: Duration = .seconds(30), tickInterval: Duration = .milliseconds(100),
                    callbackAttempts: Int = 5, callbackBackoff: Duration = .seconds(1)) {
            self.maxPayloadBytes = maxPayloadBytes
            self.resultLimit = resultLimit
            self.retention = retention
            self.cancelGrace = cancelGrace
            self.slotWait = slotWait
            self.tickInterval = tickInterval
            self.callbackAttempts = callbackAttempts
            self.callbackBackoff = callbackBackoff
        }
    }

    /// One running attempt.
    private struct Running {
        var task: Task<Void, Never>?
        var pool: InstancePool?
        var lease: InstancePool.Lease?
        /// The instance was replaced (torn down): the lease must not be released.
        var leaseGone = false
        var tornDown = false
    }

    private struct State {
        var machine = TaskStateMachine()
        var running: [String: Running] = [:]
        var callbackURLs: [String: String] = [:]
        var seq: Int64
        var stopping = false
        var lastPurge = 0.0
        var lastMetrics = 0.0
        var functionsSeen: Set<String> = []
    }

    public let configuration: Configuration
    public let store: TaskStore
    private let scheduler: Scheduler
    private let invoker: any TaskInvoker
    private let callbacks: CallbackSender
    private let apiBase: @Sendable () -> String?
    /// Where instances in network namespaces of their own post progress (apusd's instance API); nil: the API.
    private let instanceAPIBase: String?
    private let state: Mutex<State>
    private let logger: Logger
    private let clock: @Sendable () -> Double

    public var maxPayloadBytes: Int { configuration.maxPayloadBytes }

    public init(configuration: Configuration, store: TaskStore, scheduler: Scheduler, invoker: any TaskInvoker,
                apiBase: @escaping @Sendable () -> String?, instanceAPIBase: String? = nil, logger: Logger,
                clock: @escaping @Sendable () -> Double = { Date().timeIntervalSince1970 }) throws(ApusError) {
        self.instanceAPIBase = instanceAPIBase
        self.configuration = configuration
        self.store = store
        self.scheduler = scheduler
        self.invoker = invoker
        self.apiBase = apiBase
        self.logger = logger
        self.clock = clock
        self.callbacks = CallbackSender(logger: logger)
        // Work left by the previous run: queued tasks queue again, running ones run again (attempt + 1).
        var state = State(seq: try store.maxSeq())
        let active = try store.active()
        for record in active {
            state.machine.configure(function: record.function, settings: Self.settings(for: record.function, catalog: scheduler.catalog))
            state.machine.enqueue(record.entry)
            if let url = record.callbackURL { state.callbackURLs[record.id] = url }
        }
        self.state = Mutex(state)
        if !active.isEmpty {
            logger.info("resuming tasks", metadata: ["queued": "\(active.filter { $0.state == .queued }.count)",
                                                      "interrupted": "\(active.filter { $0.state == .running }.count)"])
        }
    }

    static func settings(for function: String, catalog: FunctionCatalog) -> TaskStateMachine.Settings {
        guard let manifest = manifest(for: function, catalog: catalog) else { return .init() }
        return .init(manifest.asyncSettings)
    }

    /// The manifest of the function's newest released version.
    static func manifest(for function: String, catalog: FunctionCatalog) -> FunctionManifest? {
        guard let entry = catalog.entry(function) else { return nil }
        let number = entry.record.release.activeVersions.max() ?? entry.record.latestVersion
        return entry.versions[number]?.manifest
    }

    /// How tasks reach the function, from its protocol.
    public func kind(for function: String) throws(ApusError) -> TaskSubmission.Kind {
        guard let manifest = Self.manifest(for: function, catalog: scheduler.catalog) else {
            throw ApusError(.notFound, "no function named \(function)")
        }
        switch manifest.protocol {
        case .http: return .http
        case .grpc: return .grpc
        case .thrift: return .thrift
        }
    }

    func statusURL(_ id: String) -> String { (apiBase() ?? "") + "/v1/tasks/\(id)" }

    /// Where the instance at `endpoint` posts the task's progress, with the task's capability: the instance API
    /// when the instance has a network namespace of its own (it cannot reach the control API), else the control
    /// API's route.
    func progressURL(_ id: String, endpoint: InstanceEndpoint) -> String {
        let capability = configuration.progressCapability.map { "?capability=" + $0(id) } ?? ""
        if let instanceAPIBase, endpoint != .loopback(port: endpoint.port) {
            return instanceAPIBase + "/v1/tasks/\(id)/progress" + capability
        }
        return statusURL(id) + "/progress" + capability
    }

    // MARK: submitting

    public func submit(_ submission: TaskSubmission) async throws(ApusError) -> TaskReceipt {
        guard submission.payload.count <= configuration.maxPayloadBytes else {
            throw ApusError(.tooLarge, "task payload of \(submission.payload.count) bytes exceeds the limit of \(configuration.maxPayloadBytes) bytes")
        }
        if let key = submission.idempotencyKey { try TaskSubmission.validateIdempotencyKey(key) }
        if let url = submission.callbackURL, !FunctionManifest.isCallbackURL(url) {
            throw ApusError(.badRequest, "callback URL must be an absolute http:// or https:// URL (got \"\(url.prefix(200))\")")
        }
        if let url = submission.callbackURL, let refusal = configuration.callbackPolicy.refusal(for: url, resolve: false) {
            throw ApusError(.badRequest, refusal)
        }
        let version = try scheduler.catalog.route(function: submission.function, pinnedVersion: submission.pinnedVersion, roll: 0)
        let wire = version.manifest.protocol
        switch (submission.kind, wire) {
        case (.http, .http), (.thrift, .thrift):
            break
        case (.grpc, .grpc):
            let parts = submission.method.split(separator: "/")
            guard submission.method.hasPrefix("/"), parts.count == 2, version.manifest.grpc?.services.contains(String(parts[0])) == true else {
                throw ApusError(.badRequest, "gRPC task method must be /<service>/<method> for a service of \(submission.function) (\((version.manifest.grpc?.services ?? []).joined(separator: ", "))); got \"\(submission.method.prefix(200))\"")
            }
        default:
            throw ApusError(.badRequest, "function \(submission.function) serves \(wire.rawValue); a \(submission.kind.rawValue) task cannot reach it")
        }
        let now = clock()
        let seq = state.withLock { state -> Int64 in
            state.seq += 1
            return state.seq
        }
        let record = TaskRecord(id: Self.makeID(), submission: submission, seq: seq, now: now)
        let (stored, created) = try await store.insert(record, payload: submission.payload)
        if created {
            // Made on use: the metrics backend may be bootstrapped after this manager is created.
            Counter(label: "apus_tasks_submitted_total", dimensions: [("function", stored.function)]).increment()
            let settings = TaskStateMachine.Settings(version.manifest.asyncSettings)
            let actions = state.withLock { state -> [TaskStateMachine.Action] in
                state.functionsSeen.insert(stored.function)
                if let url = stored.callbackURL { state.callbackURLs[stored.id] = url }
                guard !state.stopping else { return [] }
                state.machine.configure(function: stored.function, settings: settings)
                state.machine.enqueue(stored.entry)
                return state.machine.dispatchable(now: clock())
            }
            logger.debug("task submitted", metadata: ["task": "\(stored.id)", "function": "\(stored.function)",
                                                      "requestID": "\(submission.requestID ?? "-")"])
            // The task is durable: the caller need not wait for its first attempt to be recorded and started.
            if !actions.isEmpty { Task { await self.perform(actions) } }
        }
        return TaskReceipt(id: stored.id, created: created, statusPath: "/v1/tasks/\(stored.id)", statusURL: statusURL(stored.id))
    }

    /// `t-` and 20 characters of [0-9a-z] from two 64-bit random draws (about 103 bits).
    static func makeID() -> String {
        let alphabet = Array("0123456789abcdefghijklmnopqrstuvwxyz".utf8)
        var generator = SystemRandomNumberGenerator()
        var words = (generator.next() as UInt64, generator.next() as UInt64)
        var bytes: [UInt8] = [UInt8(ascii: "t"), UInt8(ascii: "-")]
        bytes.reserveCapacity(22)
        for i in 0..<20 {
            if i < 10 {
                bytes.append(alphabet[Int(words.0 % 36)])
                words.0 /= 36
            } else {
                bytes.append(alphabet[Int(words.1 % 36)])
                words.1 /= 36
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: queries and control

    public func task(_ id: String) throws(ApusError) -> TaskRecord {
        guard let record = try store.record(id) else { throw ApusError(.notFound, "no task \(id)") }
        return record
    }

    public func view(_ record: TaskRecord) -> TaskView { TaskView(record, statusURL: statusURL(record.id)) }

    /// Cancels a queued task at once; a running one is asked to stop (see `Configuration.cancelGrace`).
    public func cancel(_ id: String) async throws(ApusError) -> TaskRecord {
        let now = clock()
        let result = state.withLock { $0.machine.cancel(id, now: now) }
        switch result {
        case .notActive:
            let record = try task(id)
            throw ApusError(.conflict, "task \(id) already finished (\(record.state.rawValue)); only queued or running tasks can be cancelled")
        case .cancelled(let action):
            await perform([action])
        case .stopping(let action):
            try await store.apply([.cancelRequested(id: id, at: now)])
            await perform([action])
        case .alreadyStopping:
            break
        }
        logger.info("task cancel requested", metadata: ["task": "\(id)"])
        return try task(id)
    }

    public struct ProgressReply: Codable, Sendable {
        /// True once the task has been cancelled: the function should stop.
        public var cancelled: Bool
    }

    /// A progress report from the function (also a heartbeat).
    public func progress(_ id: String, progress: Double?, message: String?) async throws(ApusError) -> ProgressReply {
        if let progress, !progress.isFinite { throw ApusError(.badRequest, "progress must be a finite number") }
        if let message, message.utf8.count > 4096 { throw ApusError(.badRequest, "progress message exceeds 4096 bytes") }
        let now = clock()
        guard let cancelled = state.withLock({ $0.machine.heartbeat(id, now: now) }) else {
            let record = try task(id)
            throw ApusError(.conflict, "task \(id) is not running (\(record.state.rawValue))")
        }
        try await store.apply([.progress(id: id, progress: progress, message: message, at: now)])
        return ProgressReply(cancelled: cancelled)
    }

    // MARK: running

    public func run() async throws {
        await withGracefulShutdownHandler {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await self.resendPendingCallbacks() }
                group.addTask { await self.loop() }
            }
        } onGracefulShutdown: {
            self.state.withLock { $0.stopping = true }
        }
        // Interrupt running attempts: they stay recorded as running and run again after the next start.
        let running = state.withLock { state in state.running.values.compactMap(\.task) }
        for task in running { task.cancel() }
        for task in running { await task.value }
        await callbacks.shutdown()
        if let invoker = invoker as? InstanceTaskInvoker { await invoker.shutdown() }
        store.close()
        logger.info("task manager stopped", metadata: ["interrupted": "\(running.count)"])
    }

    private func loop() async {
        // Also ends on cancellation (another service failed and the group is being torn down): the sleep below
        // returns at once once cancelled, so only this check keeps the loop from spinning.
        while !state.withLock({ $0.stopping }), !Task.isCancelled {
            let now = clock()
            let functions = state.withLock { Array($0.functionsSeen.union($0.machine.load().keys)) }
            var settings: [(String, TaskStateMachine.Settings)] = []
            for function in functions { settings.append((function, Self.settings(for: function, catalog: scheduler.catalog))) }
            let (actions, purge, metrics) = state.withLock { state -> ([TaskStateMachine.Action], Bool, [String: TaskStateMachine.FunctionLoad]?) in
                for (function, value) in settings where state.machine.settings(of: function) != value {
                    state.machine.configure(function: function, settings: value)
                }
                let purge = now - state.lastPurge > 60
                if purge { state.lastPurge = now }
                var metrics: [String: TaskStateMachine.FunctionLoad]?
                if now - state.lastMetrics >= 1 {
                    state.lastMetrics = now
                    metrics = state.machine.load()
                    for name in state.functionsSeen where metrics?[name] == nil {
                        metrics?[name] = .init(queued: 0, running: 0, oldestQueuedAt: nil)
                    }
                }
                return (state.machine.tick(now: now), purge, metrics)
            }
            await perform(actions)
            if let metrics { report(metrics, now: now) }
            if purge {
                do {
                    let purged = try await store.purge(finishedBefore: now - configuration.retention.seconds)
                    if purged > 0 { logger.info("purged finished tasks past retention", metadata: ["count": "\(purged)"]) }
                } catch {
                    logger.warning("purging old tasks failed", metadata: ["error": "\(error)"])
                }
            }
            try? await Task.sleep(for: configuration.tickInterval)
        }
    }

    private func report(_ load: [String: TaskStateMachine.FunctionLoad], now: Double) {
        for (function, value) in load {
            let dimensions = [("function", function)]
            Gauge(label: "apus_tasks_queued", dimensions: dimensions).record(value.queued)
            Gauge(label: "apus_tasks_running", dimensions: dimensions).record(value.running)
            Gauge(label: "apus_tasks_oldest_queued_age_seconds", dimensions: dimensions).record(value.oldestQueuedAt.map { max(0, now - $0) } ?? 0)
        }
    }

    /// Carries out the state machine's actions: persists them (in one group transaction), then starts attempts
    /// and stops running ones.
    private func perform(_ actions: [TaskStateMachine.Action], results: [String: InvocationResult] = [:], function: String? = nil) async {
        guard !actions.isEmpty else { return }
        var updates: [TaskStore.Update] = []
        var dispatches: [TaskStateMachine.Dispatch] = []
        var aborts: [(String, TaskStateMachine.AbortReason)] = []
        var finished: [(String, TaskState, String?)] = []
        let now = clock()
        for action in actions {
            switch action {
            case .dispatch(let dispatch):
                dispatches.append(dispatch)
                updates.append(.running(id: dispatch.id, attempt: dispatch.attempt, startedAt: dispatch.startedAt))
            case .abort(let id, let reason):
                aborts.append((id, reason))
            case .requeue(let id, let attempt, let throttles, let notBefore, let error):
                updates.append(.requeued(id: id, attempt: attempt, throttles: throttles, notBefore: notBefore, error: error, at: now))
            case .finish(let id, let state, let error):
                let result = results[id]
                let callback = self.callbackURL(for: id)
                updates.append(.finished(id: id, state: state, at: now, error: error,
                                         result: state == .succeeded ? result?.result : nil,
                                         resultContentType: state == .succeeded ? result?.contentType : nil,
                                         statusCode: result?.statusCode, callbackPending: callback != nil))
                finished.append((id, state, error))
            }
        }
        do {
            try await store.apply(updates)
        } catch {
            logger.error("recording task changes failed", metadata: ["error": "\(error)"])
        }
        for (id, state, error) in finished {
            let function = function ?? (try? store.record(id))?.function ?? "unknown"
            Counter(label: "apus_tasks_completed_total", dimensions: [("function", function), ("outcome", state.rawValue)]).increment()
            var metadata: Logger.Metadata = ["task": "\(id)", "function": "\(function)", "state": "\(state.rawValue)"]
            if let error { metadata["error"] = "\(error)" }
            logger.info("task finished", metadata: metadata)
            if let url = self.state.withLock({ $0.callbackURLs.removeValue(forKey: id) }) ?? self.callbackURL(for: id) {
                Task { await self.deliverCallback(id: id, url: url) }
            }
        }
        for dispatch in dispatches { start(dispatch) }
        for (id, reason) in aborts { abort(id, reason: reason) }
    }

    private func callbackURL(for id: String) -> String? {
        if let url = state.withLock({ $0.callbackURLs[id] }) { return url }
        guard let record = try? store.record(id) else { return nil }
        return Self.manifest(for: record.function, catalog: scheduler.catalog)?.async?.callback
    }

    private func start(_ dispatch: TaskStateMachine.Dispatch) {
        state.withLock { $0.running[dispatch.id] = Running() }
        let task = Task { await self.attempt(dispatch) }
        state.withLock { state in
            if state.running[dispatch.id] != nil { state.running[dispatch.id]!.task = task }
        }
    }

    private func abort(_ id: String, reason: TaskStateMachine.AbortReason) {
        logger.info("stopping task attempt", metadata: ["task": "\(id)", "reason": "\(reason.rawValue)"])
        if reason == .cancelled {
            // The function hears of it on its next progress report; after the grace period it is torn down.
            let grace = configuration.cancelGrace
            Task {
                try? await Task.sleep(for: grace)
                self.tearDown(id)
            }
        } else {
            tearDown(id)
        }
    }

    /// Ends a running attempt from outside: its invocation is cancelled (the connection to the instance closes) and
    /// the instance it ran on is replaced, since it may still be working on it.
    private func tearDown(_ id: String) {
        let (task, lease, pool) = state.withLock { state -> (Task<Void, Never>?, InstancePool.Lease?, InstancePool?) in
            guard var running = state.running[id], !running.tornDown else { return (nil, nil, nil) }
            running.tornDown = true
            var lease: InstancePool.Lease?
            if let held = running.lease, !running.leaseGone {
                running.leaseGone = true
                lease = held
            }
            state.running[id] = running
            return (running.task, lease, running.pool)
        }
        task?.cancel()
        if let lease, let pool {
            logger.warning("replacing the instance of a stopped task attempt", metadata: ["task": "\(id)", "instance": "\(lease.instanceID)"])
            pool.reportUnreachable(lease)
        }
    }

    /// One attempt, from taking a slot to recording the outcome.
    private func attempt(_ dispatch: TaskStateMachine.Dispatch) async {
        let id = dispatch.id
        var logger = self.logger
        logger[metadataKey: "task"] = "\(id)"
        logger[metadataKey: "function"] = "\(dispatch.function)"
        logger[metadataKey: "attempt"] = "\(dispatch.attempt)"
        let result: InvocationResult
        do throws(ApusError) {
            guard let record = try store.record(id), let payload = try store.payload(of: id) else {
                throw ApusError(.notFound, "task \(id) vanished from the store")
            }
            let version: FunctionVersion
            do throws(ApusError) {
                version = try scheduler.catalog.route(function: record.function, pinnedVersion: record.pinnedVersion)
            } catch {
                finish(id, function: dispatch.function, InvocationResult(outcome: .failed("cannot run: \(error.message)", retryable: false)))
                return
            }
            logger[metadataKey: "version"] = "\(version.number)"
            let pool = scheduler.pool(for: version)
            let lease: InstancePool.Lease
            do throws(ApusError) {
                lease = try await pool.acquire(requestID: "\(id)-\(dispatch.attempt)", deadline: .now.advanced(by: configuration.slotWait))
            } catch {
                if Task.isCancelled {
                    finish(id, function: dispatch.function, InvocationResult(outcome: .aborted))
                } else {
                    logger.info("no instance slot for task attempt", metadata: ["reason": "\(error.message)"])
                    finish(id, function: dispatch.function, InvocationResult(outcome: .throttled(error.message)))
                }
                return
            }
            let tornDown = state.withLock { state -> Bool in
                state.running[id]?.pool = pool
                state.running[id]?.lease = lease
                return state.running[id]?.tornDown ?? true
            }
            if tornDown {
                pool.release(lease)
                finish(id, function: dispatch.function, InvocationResult(outcome: .aborted))
                return
            }
            logger.info("task attempt started", metadata: ["instance": "\(lease.instanceID)"])
            // Where it runs is for display: recorded without holding up the invocation.
            let store = self.store
            let placed = TaskStore.Update.placed(id: id, instanceID: lease.instanceID, version: version.number)
            Task { try? await store.apply([placed]) }
            let invocation = TaskInvocation(
                task: record, payload: payload, attempt: dispatch.attempt, version: version, instanceID: lease.instanceID,
                endpoint: lease.endpoint, timeout: max(0.01, dispatch.deadline - clock()),
                progressURL: progressURL(id, endpoint: lease.endpoint),
                resultLimit: configuration.resultLimit)
            result = await invoker.invoke(invocation)
            let releaseLease = state.withLock { state -> Bool in
                guard state.running[id]?.leaseGone == false else { return false }
                state.running[id]?.leaseGone = true
                return true
            }
            if releaseLease {
                if result.unreachable { pool.reportUnreachable(lease) } else { pool.release(lease) }
            }
        } catch {
            result = InvocationResult(outcome: .failed(error.message, retryable: false))
        }
        finish(id, function: dispatch.function, Task.isCancelled && result.outcome != .succeeded ? InvocationResult(outcome: .aborted) : result)
    }

    private func finish(_ id: String, function: String, _ result: InvocationResult) {
        let now = clock()
        let actions = state.withLock { state -> [TaskStateMachine.Action]? in
            state.running[id] = nil
            // Stopping: an interrupted attempt is left as it is recorded (running) and runs again after restart.
            if state.stopping, result.outcome != .succeeded { return nil }
            return state.machine.completed(id, outcome: result.outcome, now: now)
        }
        guard let actions else { return }
        if case .failed(let message, _) = result.outcome {
            logger.info("task attempt failed", metadata: ["task": "\(id)", "function": "\(function)", "error": "\(message)"])
        }
        Task { await self.perform(actions, results: [id: result], function: function) }
    }

    // MARK: callbacks

    private func deliverCallback(id: String, url: String) async {
        guard let record = try? store.record(id) else { return }
        let body: Data
        do {
            body = try TaskView.encoder.encode(view(record))
        } catch {
            return
        }
        let (delivered, attempts) = await callbacks.deliver(body, to: url, attempts: configuration.callbackAttempts,
                                                            backoff: configuration.callbackBackoff, task: id,
                                                            policy: configuration.callbackPolicy)
        try? await store.apply([.callback(id: id, state: delivered ? "delivered" : "failed", attempts: attempts)])
    }

    private func resendPendingCallbacks() async {
        guard let pending = try? store.pendingCallbacks(), !pending.isEmpty else { return }
        for record in pending {
            guard let url = record.callbackURL ?? Self.manifest(for: record.function, catalog: scheduler.catalog)?.async?.callback else {
                try? await store.apply([.callback(id: record.id, state: "failed", attempts: record.callbackAttempts)])
                continue
            }
            Task { await self.deliverCallback(id: record.id, url: url) }
        }
    }
}

extension TaskView {
    /// ISO 8601 dates, sorted keys: the API's JSON.
    public static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }()
}
