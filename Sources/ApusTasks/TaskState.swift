/// Where a task is in its life: `queued → running → succeeded | failed | cancelled | timed_out`, or `expired` when
/// it waited (or kept failing) past the function's `async.max_age`. Failed, timed-out and expired tasks form the
/// dead-letter list.
public enum TaskState: String, Codable, Sendable, CaseIterable {
    case queued
    case running
    case succeeded
    case failed
    case cancelled
    case timedOut = "timed_out"
    case expired

    public var isTerminal: Bool { self != .queued && self != .running }

    /// Exhausted or unrunnable tasks: kept in the dead-letter list.
    public var isDead: Bool { self == .failed || self == .timedOut || self == .expired }
}
