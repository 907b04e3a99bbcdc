import Synchronization

/// Time as the platform's state machines see it: what "now" is, a timer that fires once at an instant, and a
/// sleep for periodic loops. Production code uses `SystemClock` (the monotonic clock); unit tests use
/// `ManualClock` and move time by hand, so deadlines, queue expiry and periodic work are tested without waiting.
/// Instants are `ContinuousClock.Instant` either way: state machines keep one instant type.
public protocol SchedulingClock: Sendable {
    var now: ContinuousClock.Instant { get }
    /// Runs `action` once, at `deadline` or soon after, unless the returned timer is cancelled first. `action`
    /// runs on no particular thread.
    func schedule(at deadline: ContinuousClock.Instant, _ action: @escaping @Sendable () -> Void) -> ClockTimer
    /// Returns at `deadline` (or after); throws `CancellationError` when the calling task is cancelled.
    func sleep(until deadline: ContinuousClock.Instant) async throws
}

extension SchedulingClock {
    public func sleep(for duration: Duration) async throws {
        try await sleep(until: now.advanced(by: duration))
    }
}

/// A scheduled action; `cancel()` keeps it from running (a no-op once it ran).
public struct ClockTimer: Sendable {
    private let onCancel: @Sendable () -> Void

    public init(onCancel: @escaping @Sendable () -> Void) {
        self.onCancel = onCancel
    }

    public func cancel() {
        onCancel()
    }
}

/// The monotonic clock. A timer is a task sleeping until its deadline.
public struct SystemClock: SchedulingClock {
    public init() {}

    public var now: ContinuousClock.Instant { .now }

    public func schedule(at deadline: ContinuousClock.Instant, _ action: @escaping @Sendable () -> Void) -> ClockTimer {
        let task = Task {
            try? await Task.sleep(until: deadline, clock: .continuous)
            guard !Task.isCancelled else { return }
            action()
        }
        return ClockTimer { task.cancel() }
    }

    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        try await Task.sleep(until: deadline, clock: .continuous)
    }
}

/// A clock that stands still until `advance(by:)` moves it; timers and sleepers whose deadline is reached run
/// then, in deadline order, on the caller's thread (sleepers resume on their own executors). A timer scheduled for
/// an instant already passed runs at the next `advance` (`advance(by: .zero)` runs it). For unit tests.
public final class ManualClock: SchedulingClock {
    private struct Pending {
        var id: Int
        var deadline: ContinuousClock.Instant
        var fire: @Sendable () -> Void
    }

    private struct State {
        var now: ContinuousClock.Instant
        var nextID = 0
        var pending: [Pending] = []
    }

    private let state: Mutex<State>

    public init(start: ContinuousClock.Instant = .now) {
        state = Mutex(State(now: start))
    }

    public var now: ContinuousClock.Instant { state.withLock { $0.now } }

    /// How many timers and sleepers are waiting for a later instant.
    public var pendingCount: Int { state.withLock { $0.pending.count } }

    public func schedule(at deadline: ContinuousClock.Instant, _ action: @escaping @Sendable () -> Void) -> ClockTimer {
        // Never run here, even when due: the caller may hold a lock the action takes. It runs at the next advance.
        let id = state.withLock { state -> Int in
            state.nextID += 1
            state.pending.append(Pending(id: state.nextID, deadline: deadline, fire: action))
            return state.nextID
        }
        return ClockTimer { [weak self] in self?.state.withLock { $0.pending.removeAll { $0.id == id } } }
    }

    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        let box = Mutex<CheckedContinuation<Void, any Error>?>(nil)
        let id = state.withLock { state -> Int in
            state.nextID += 1
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                box.withLock { $0 = continuation }
                let due = state.withLock { state -> Bool in
                    if deadline <= state.now { return true }
                    state.pending.append(Pending(id: id, deadline: deadline, fire: {
                        box.withLock { $0.take() }?.resume()
                    }))
                    return false
                }
                if due || Task.isCancelled {
                    state.withLock { $0.pending.removeAll { $0.id == id } }
                    let continuation = box.withLock { $0.take() }
                    if due { continuation?.resume() } else { continuation?.resume(throwing: CancellationError()) }
                }
            }
        } onCancel: {
            state.withLock { $0.pending.removeAll { $0.id == id } }
            box.withLock { $0.take() }?.resume(throwing: CancellationError())
        }
    }

    /// Moves time forward by `duration`, running everything that comes due on the way, earliest first (an action
    /// that schedules more within the new time runs too).
    public func advance(by duration: Duration) {
        let target = state.withLock { $0.now.advanced(by: duration) }
        while true {
            let next = state.withLock { state -> Pending? in
                guard let index = state.pending.indices.min(by: { state.pending[$0].deadline < state.pending[$1].deadline }),
                      state.pending[index].deadline <= target else {
                    state.now = target
                    return nil
                }
                let due = state.pending.remove(at: index)
                state.now = max(state.now, due.deadline)
                return due
            }
            guard let next else { return }
            next.fire()
        }
    }
}
