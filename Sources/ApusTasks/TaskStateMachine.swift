import ApusCore

/// The task manager's decisions as a pure state machine over the active (queued and running) tasks, driven by the
/// time passed in (seconds since 1970, so that persisted timestamps and tests' clocks read the same). It decides
/// which task runs next (per function: priority, then submission order; within the function's `async.concurrency`
/// budget and `async.rate`), when a running one has timed out or gone silent, and what a finished attempt leads to
/// (success, a retry after exponential backoff, or a final failure), and handles cancellation in every state. It
/// never touches the store or the network: `TaskManager` carries out its actions.
public struct TaskStateMachine: Sendable {
    /// A function's `async:` settings in seconds.
    public struct Settings: Equatable, Sendable {
        public var concurrency: Int
        public var timeout: Double
        public var retries: Int
        public var backoff: Double
        public var maxBackoff: Double
        public var maxAge: Double
        public var rate: Double?
        public var heartbeat: Double?

        public init(concurrency: Int = 4, timeout: Double = 900, retries: Int = 2, backoff: Double = 1, maxBackoff: Double = 300,
                    maxAge: Double = 21_600, rate: Double? = nil, heartbeat: Double? = nil) {
            self.concurrency = concurrency
            self.timeout = timeout
            self.retries = retries
            self.backoff = backoff
            self.maxBackoff = maxBackoff
            self.maxAge = maxAge
            self.rate = rate
            self.heartbeat = heartbeat
        }

        public init(_ settings: FunctionManifest.AsyncSettings) {
            self.init(concurrency: settings.concurrency, timeout: settings.timeout.seconds, retries: settings.retries,
                      backoff: settings.backoff.seconds, maxBackoff: settings.maxBackoff.seconds, maxAge: settings.maxAge.seconds,
                      rate: settings.rate, heartbeat: settings.heartbeat?.seconds)
        }

        /// The delay before attempt `n + 1` after `n` attempts (or throttles): backoff · 2^(n-1), capped.
        public func delay(after n: Int) -> Double {
            let exponent = Double(max(0, min(n - 1, 60)))
            return min(maxBackoff, backoff * pow2(exponent))
        }

        private func pow2(_ e: Double) -> Double {
            var result = 1.0
            var i = 0.0
            while i < e { result *= 2; i += 1 }
            return result
        }
    }

    /// Why a running attempt is being stopped.
    public enum AbortReason: String, Sendable, Equatable {
        case timeout
        case heartbeatLost = "heartbeat_lost"
        case cancelled
    }

    /// What a task needs to be tracked; everything else stays in the store.
    public struct Entry: Sendable, Equatable {
        public var id: String
        public var function: String
        public var priority: Int
        /// Submission order.
        public var seq: Int64
        public var createdAt: Double
        /// Attempts made so far (the running one included).
        public var attempt: Int
        /// Times no instance slot could be had (these do not use up attempts).
        public var throttles: Int
        /// Not dispatched before this time (backoff).
        public var notBefore: Double
        public var running: Bool
        public var startedAt: Double?
        public var deadline: Double?
        public var lastHeartbeat: Double?
        public var aborting: AbortReason?

        public init(id: String, function: String, priority: Int = 0, seq: Int64, createdAt: Double, attempt: Int = 0,
                    throttles: Int = 0, notBefore: Double = 0) {
            self.id = id
            self.function = function
            self.priority = priority
            self.seq = seq
            self.createdAt = createdAt
            self.attempt = attempt
            self.throttles = throttles
            self.notBefore = notBefore
            self.running = false
        }
    }

    public struct Dispatch: Sendable, Equatable {
        public var id: String
        public var function: String
        public var attempt: Int
        public var startedAt: Double
        public var deadline: Double
    }

    public enum Action: Sendable, Equatable {
        /// Start an attempt (record it as running first).
        case dispatch(Dispatch)
        /// Stop the running attempt; its invocation ends with `.aborted` (or whatever it reaches first).
        case abort(id: String, reason: AbortReason)
        /// Back to the queue until `notBefore`.
        case requeue(id: String, attempt: Int, throttles: Int, notBefore: Double, error: String)
        /// The task is over.
        case finish(id: String, state: TaskState, error: String?)
    }

    /// How an attempt ended, as the invoker saw it.
    public enum Outcome: Sendable, Equatable {
        case succeeded
        /// The function failed; `retryable` false for answers a retry cannot change (bad request, result too large).
        case failed(String, retryable: Bool)
        /// No slot on an instance could be had in time: no attempt was made.
        case throttled(String)
        /// Stopped because it was asked to (abort) or the platform is stopping.
        case aborted
    }

    public enum CancelResult: Sendable, Equatable {
        /// Not active here: finished already, or unknown.
        case notActive
        /// Was queued: now cancelled.
        case cancelled(Action)
        /// Is running: its invocation is being stopped.
        case stopping(Action)
        /// Cancellation was already asked for.
        case alreadyStopping
    }

    private struct Queue {
        var settings = Settings()
        var running = 0
        /// Queued ids in dispatch order (priority high to low, then seq).
        var order: [String] = []
        /// Queued tasks per priority. Within a priority the first in `order` is the oldest (submission order), so
        /// the oldest queued task is found without walking the queue.
        var levels: [Int: Int] = [:]
        var tokens = 0.0
        var refilledAt: Double?
    }

    private var entries: [String: Entry] = [:]
    private var queues: [String: Queue] = [:]
    /// Ids of running entries (timeouts and heartbeats are checked on every tick).
    private var runningIDs: Set<String> = []
    private var lastExpiryScan = -Double.infinity

    public init() {}

    // MARK: reading

    public func entry(_ id: String) -> Entry? { entries[id] }
    public var activeCount: Int { entries.count }

    public struct FunctionLoad: Sendable, Equatable {
        public var queued: Int
        public var running: Int
        /// Submission time of the oldest queued task.
        public var oldestQueuedAt: Double?
    }

    public func load() -> [String: FunctionLoad] {
        var result: [String: FunctionLoad] = [:]
        for (name, queue) in queues {
            var oldest: Double?
            var index = 0
            for priority in queue.levels.keys.sorted(by: >) {
                if index < queue.order.count, let created = entries[queue.order[index]]?.createdAt {
                    oldest = min(oldest ?? created, created)
                }
                index += queue.levels[priority]!
            }
            result[name] = FunctionLoad(queued: queue.order.count, running: queue.running, oldestQueuedAt: oldest)
        }
        return result
    }

    public func settings(of function: String) -> Settings { queues[function]?.settings ?? Settings() }

    // MARK: configuration and arrivals

    public mutating func configure(function: String, settings: Settings) {
        queues[function, default: Queue()].settings = settings
    }

    /// A task to run (a new submission, or one found queued or running in the store at start-up: those run again).
    public mutating func enqueue(_ entry: Entry) {
        var entry = entry
        entry.running = false
        entry.startedAt = nil
        entry.deadline = nil
        entry.lastHeartbeat = nil
        entry.aborting = nil
        entries[entry.id] = entry
        // Taken out of the dictionary while it changes, so its order array stays uniquely referenced (no copy).
        var queue = queues.removeValue(forKey: entry.function) ?? Queue()
        insert(entry, into: &queue)
        queues[entry.function] = queue
    }

    private func insert(_ entry: Entry, into queue: inout Queue) {
        queue.levels[entry.priority, default: 0] += 1
        // Most arrivals go last (same priority, newest): no search.
        if let lastID = queue.order.last, let last = entries[lastID],
           last.priority > entry.priority || (last.priority == entry.priority && last.seq < entry.seq) {
            queue.order.append(entry.id)
            return
        }
        // Binary search for the first position that sorts after this entry.
        var low = 0
        var high = queue.order.count
        while low < high {
            let mid = (low + high) / 2
            let other = entries[queue.order[mid]]!
            if other.priority > entry.priority || (other.priority == entry.priority && other.seq < entry.seq) {
                low = mid + 1
            } else {
                high = mid
            }
        }
        queue.order.insert(entry.id, at: low)
    }

    // MARK: time

    /// Expires queued tasks past their maximum age, stops running ones past their timeout or heartbeat, and starts
    /// what the budgets allow. Running tasks are checked on every tick; queued ones for expiry at most once a second
    /// (a maximum age is at least a second), so a tick stays cheap with a long queue.
    public mutating func tick(now: Double) -> [Action] {
        var actions: [Action] = []
        for id in runningIDs.sorted() {
            guard let entry = entries[id], entry.aborting == nil else { continue }
            let settings = self.settings(of: entry.function)
            if let deadline = entry.deadline, now >= deadline {
                entries[id]!.aborting = .timeout
                actions.append(.abort(id: id, reason: .timeout))
            } else if let heartbeat = settings.heartbeat, let last = entry.lastHeartbeat, now - last > heartbeat {
                entries[id]!.aborting = .heartbeatLost
                actions.append(.abort(id: id, reason: .heartbeatLost))
            }
        }
        if now - lastExpiryScan >= 1 || now < lastExpiryScan {
            lastExpiryScan = now
            for function in queues.keys.sorted() {
                let maxAge = queues[function]!.settings.maxAge
                for id in queues[function]!.order {
                    guard let entry = entries[id], now - entry.createdAt > maxAge else { continue }
                    remove(id)
                    actions.append(.finish(id: id, state: .expired, error: "expired: not run within async.max_age of \(Self.format(maxAge)) after submission"))
                }
            }
        }
        actions += dispatchable(now: now)
        return actions
    }

    /// Starts every task the concurrency budgets and rate limits allow now.
    public mutating func dispatchable(now: Double) -> [Action] {
        var actions: [Action] = []
        for function in queues.keys.sorted() {
            var queue = queues.removeValue(forKey: function)!
            defer { queues[function] = queue }
            if let rate = queue.settings.rate {
                let burst = max(1, rate)
                if let last = queue.refilledAt {
                    queue.tokens = min(burst, queue.tokens + (now - last) * rate)
                } else {
                    queue.tokens = burst
                }
                queue.refilledAt = now
            }
            var index = 0
            while queue.running < queue.settings.concurrency, index < queue.order.count {
                let id = queue.order[index]
                guard var entry = entries[id], entry.notBefore <= now else {
                    index += 1
                    continue
                }
                if queue.settings.rate != nil {
                    guard queue.tokens >= 1 else { break }
                    queue.tokens -= 1
                }
                queue.order.remove(at: index)
                Self.leave(entry.priority, &queue)
                queue.running += 1
                entry.running = true
                runningIDs.insert(id)
                entry.attempt += 1
                entry.startedAt = now
                entry.deadline = now + queue.settings.timeout
                entry.lastHeartbeat = now
                entries[id] = entry
                actions.append(.dispatch(Dispatch(id: id, function: function, attempt: entry.attempt, startedAt: now, deadline: now + queue.settings.timeout)))
            }
        }
        return actions
    }

    // MARK: events

    /// A running attempt ended.
    public mutating func completed(_ id: String, outcome: Outcome, now: Double) -> [Action] {
        guard var entry = entries[id], entry.running else { return [] }
        runningIDs.remove(id)
        var queue = queues[entry.function] ?? Queue()
        queue.running = max(0, queue.running - 1)
        queues[entry.function] = queue
        let settings = queue.settings
        entry.running = false
        var actions: [Action]
        switch (entry.aborting, outcome) {
        case (.cancelled, _):
            remove(id)
            actions = [.finish(id: id, state: .cancelled, error: "cancelled while running (attempt \(entry.attempt))")]
        case (_, .succeeded):
            remove(id)
            actions = [.finish(id: id, state: .succeeded, error: nil)]
        case (.timeout, _):
            actions = retry(&entry, settings: settings, now: now, finalState: .timedOut,
                            error: "timed out after async.timeout of \(Self.format(settings.timeout))")
        case (.heartbeatLost, _):
            actions = retry(&entry, settings: settings, now: now, finalState: .failed,
                            error: "lost: no progress report for async.heartbeat of \(Self.format(settings.heartbeat ?? 0))")
        case (nil, .failed(let message, let retryable)):
            if retryable {
                actions = retry(&entry, settings: settings, now: now, finalState: .failed, error: message)
            } else {
                remove(id)
                actions = [.finish(id: id, state: .failed, error: message)]
            }
        case (nil, .throttled(let message)):
            entry.attempt -= 1
            entry.throttles += 1
            let notBefore = now + settings.delay(after: entry.throttles)
            if notBefore - entry.createdAt > settings.maxAge {
                remove(id)
                actions = [.finish(id: id, state: .expired, error: "expired: no instance slot within async.max_age (\(message))")]
            } else {
                actions = [requeue(&entry, notBefore: notBefore, error: message)]
            }
        case (nil, .aborted):
            // Stopped from outside (the platform is stopping): runs again, with this attempt counted.
            actions = [requeue(&entry, notBefore: now, error: "interrupted")]
        }
        return actions + dispatchable(now: now)
    }

    private mutating func retry(_ entry: inout Entry, settings: Settings, now: Double, finalState: TaskState, error: String) -> [Action] {
        let maxAttempts = settings.retries + 1
        guard entry.attempt < maxAttempts else {
            remove(entry.id)
            return [.finish(id: entry.id, state: finalState, error: "\(error) (attempt \(entry.attempt) of \(maxAttempts); retries exhausted)")]
        }
        let notBefore = now + settings.delay(after: entry.attempt)
        if notBefore - entry.createdAt > settings.maxAge {
            remove(entry.id)
            return [.finish(id: entry.id, state: .expired, error: "expired: the next retry would start after async.max_age of \(Self.format(settings.maxAge)); last error: \(error)")]
        }
        return [requeue(&entry, notBefore: notBefore, error: error)]
    }

    private mutating func requeue(_ entry: inout Entry, notBefore: Double, error: String) -> Action {
        entry.notBefore = notBefore
        enqueue(entry)
        return .requeue(id: entry.id, attempt: entry.attempt, throttles: entry.throttles, notBefore: notBefore, error: error)
    }

    /// A progress report (heartbeat) from a running task. Returns nil when the task is not running; otherwise
    /// whether it has been asked to stop.
    public mutating func heartbeat(_ id: String, now: Double) -> Bool? {
        guard let entry = entries[id], entry.running else { return nil }
        entries[id]!.lastHeartbeat = now
        return entry.aborting == .cancelled
    }

    public mutating func cancel(_ id: String, now: Double) -> CancelResult {
        guard var entry = entries[id] else { return .notActive }
        if !entry.running {
            remove(id)
            return .cancelled(.finish(id: id, state: .cancelled, error: "cancelled while queued"))
        }
        if entry.aborting == .cancelled { return .alreadyStopping }
        let wasAborting = entry.aborting != nil
        entry.aborting = .cancelled
        entries[id] = entry
        // An attempt already being stopped for another reason ends as cancelled; it needs no second abort.
        return wasAborting ? .alreadyStopping : .stopping(.abort(id: id, reason: .cancelled))
    }

    private mutating func remove(_ id: String) {
        guard let entry = entries.removeValue(forKey: id) else { return }
        runningIDs.remove(id)
        if !entry.running, var queue = queues.removeValue(forKey: entry.function) {
            if let index = queue.order.firstIndex(of: id) {
                queue.order.remove(at: index)
                Self.leave(entry.priority, &queue)
            }
            queues[entry.function] = queue
        }
    }

    private static func leave(_ priority: Int, _ queue: inout Queue) {
        let left = (queue.levels[priority] ?? 1) - 1
        queue.levels[priority] = left > 0 ? left : nil
    }

    static func format(_ seconds: Double) -> String {
        Duration.milliseconds(Int64((seconds * 1000).rounded())).humanReadable
    }
}
