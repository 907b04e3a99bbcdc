import ApusCore
import ApusTasks
import Testing

/// Drives the task state machine with a test clock (plain seconds): no store, no sockets, no real time.
@Suite("task state machine")
struct TaskStateMachineTests {
    typealias Machine = TaskStateMachine
    typealias Action = Machine.Action

    /// A manual clock: time only moves when the test says so.
    struct TestClock {
        var now = 1_000_000.0
        mutating func advance(_ seconds: Double) { now += seconds }
    }

    static func machine(_ settings: Machine.Settings = .init(concurrency: 2, timeout: 60, retries: 2, backoff: 1, maxBackoff: 10, maxAge: 3600)) -> Machine {
        var machine = Machine()
        machine.configure(function: "f", settings: settings)
        return machine
    }

    static func entry(_ id: String, seq: Int64, priority: Int = 0, at: Double, function: String = "f") -> Machine.Entry {
        Machine.Entry(id: id, function: function, priority: priority, seq: seq, createdAt: at)
    }

    func dispatched(_ actions: [Action]) -> [String] {
        actions.compactMap { if case .dispatch(let d) = $0 { d.id } else { nil } }
    }

    func finished(_ actions: [Action]) -> [String: TaskState] {
        var out: [String: TaskState] = [:]
        for case .finish(let id, let state, _) in actions { out[id] = state }
        return out
    }

    @Test("FIFO within the concurrency budget; a finished task lets the next one start")
    func fifoWithinBudget() {
        var clock = TestClock()
        var m = Self.machine()
        for i in 1...4 { m.enqueue(Self.entry("t\(i)", seq: Int64(i), at: clock.now)) }
        #expect(dispatched(m.tick(now: clock.now)) == ["t1", "t2"])
        #expect(dispatched(m.tick(now: clock.now)).isEmpty, "budget of 2 is used up")
        clock.advance(1)
        let after = m.completed("t1", outcome: .succeeded, now: clock.now)
        #expect(finished(after) == ["t1": .succeeded])
        #expect(dispatched(after) == ["t3"])
        let load = m.load()["f"]
        #expect(load?.queued == 1)
        #expect(load?.running == 2)
        #expect(load?.oldestQueuedAt == clock.now - 1)
    }

    @Test("higher priority runs first; equal priorities keep submission order")
    func priority() {
        let clock = TestClock()
        var m = Self.machine(.init(concurrency: 1))
        m.enqueue(Self.entry("low", seq: 1, priority: 0, at: clock.now))
        m.enqueue(Self.entry("high-a", seq: 2, priority: 5, at: clock.now))
        m.enqueue(Self.entry("high-b", seq: 3, priority: 5, at: clock.now))
        m.enqueue(Self.entry("mid", seq: 4, priority: 1, at: clock.now))
        var order: [String] = []
        var actions = m.tick(now: clock.now)
        while let next = dispatched(actions).first {
            order.append(next)
            actions = m.completed(next, outcome: .succeeded, now: clock.now)
        }
        #expect(order == ["high-a", "high-b", "mid", "low"])
    }

    @Test("retries back off exponentially up to the cap, then the task fails into the dead-letter list")
    func retriesWithBackoff() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 1, timeout: 60, retries: 3, backoff: 2, maxBackoff: 5, maxAge: 3600))
        m.enqueue(Self.entry("t", seq: 1, at: clock.now))
        #expect(dispatched(m.tick(now: clock.now)) == ["t"])
        var delays: [Double] = []
        for attempt in 1...3 {
            let actions = m.completed("t", outcome: .failed("boom", retryable: true), now: clock.now)
            guard case .requeue(_, let n, _, let notBefore, let error)? = actions.first else {
                Issue.record("attempt \(attempt) should be retried, got \(actions)")
                return
            }
            #expect(n == attempt)
            #expect(error == "boom")
            delays.append(notBefore - clock.now)
            clock.advance(notBefore - clock.now - 0.5)
            #expect(dispatched(m.tick(now: clock.now)).isEmpty, "not before the backoff has passed")
            clock.advance(0.5)
            let next = m.tick(now: clock.now)
            #expect(dispatched(next) == ["t"])
            if case .dispatch(let d)? = next.first { #expect(d.attempt == attempt + 1) }
        }
        #expect(delays == [2, 4, 5], "2s, doubled, capped at 5s")
        let last = m.completed("t", outcome: .failed("boom", retryable: true), now: clock.now)
        #expect(finished(last) == ["t": .failed])
        if case .finish(_, _, let error)? = last.first { #expect(error?.contains("attempt 4 of 4") == true) }
        #expect(TaskState.failed.isDead)
        #expect(m.entry("t") == nil)
    }

    @Test("a failure a retry cannot change fails at once")
    func nonRetryable() {
        let clock = TestClock()
        var m = Self.machine()
        m.enqueue(Self.entry("t", seq: 1, at: clock.now))
        _ = m.tick(now: clock.now)
        #expect(finished(m.completed("t", outcome: .failed("HTTP 400", retryable: false), now: clock.now)) == ["t": .failed])
    }

    @Test("a running attempt past its timeout is stopped, retried, and finally timed out")
    func timeout() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 1, timeout: 10, retries: 1, backoff: 1, maxBackoff: 1, maxAge: 3600))
        m.enqueue(Self.entry("t", seq: 1, at: clock.now))
        _ = m.tick(now: clock.now)
        clock.advance(9.9)
        #expect(m.tick(now: clock.now).isEmpty)
        clock.advance(0.1)
        #expect(m.tick(now: clock.now) == [.abort(id: "t", reason: .timeout)])
        #expect(m.tick(now: clock.now).isEmpty, "abort is asked once")
        // The torn-down invocation reports whatever it saw; the timeout decides.
        let retried = m.completed("t", outcome: .aborted, now: clock.now)
        guard case .requeue(_, 1, _, _, let error)? = retried.first else {
            Issue.record("expected a retry, got \(retried)")
            return
        }
        #expect(error.contains("timed out"))
        clock.advance(1)
        _ = m.tick(now: clock.now)
        clock.advance(10)
        #expect(m.tick(now: clock.now) == [.abort(id: "t", reason: .timeout)])
        #expect(finished(m.completed("t", outcome: .failed("connection closed", retryable: true), now: clock.now)) == ["t": .timedOut])
    }

    @Test("a running task whose heartbeats stop is lost and retried; heartbeats keep it alive")
    func heartbeatLoss() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 1, timeout: 3600, retries: 1, backoff: 1, maxBackoff: 1, maxAge: 7200, heartbeat: 5))
        m.enqueue(Self.entry("t", seq: 1, at: clock.now))
        _ = m.tick(now: clock.now)
        for _ in 0..<5 {
            clock.advance(4)
            #expect(m.heartbeat("t", now: clock.now) == false)
            #expect(m.tick(now: clock.now).isEmpty)
        }
        clock.advance(5.1)
        #expect(m.tick(now: clock.now) == [.abort(id: "t", reason: .heartbeatLost)])
        let actions = m.completed("t", outcome: .aborted, now: clock.now)
        guard case .requeue(_, _, _, _, let error)? = actions.first else {
            Issue.record("expected a retry, got \(actions)")
            return
        }
        #expect(error.contains("lost"))
        #expect(m.heartbeat("t", now: clock.now) == nil, "not running now")
    }

    @Test("a task not started within max_age expires; so does one whose next retry would start too late")
    func expiry() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 1, timeout: 60, retries: 5, backoff: 30, maxBackoff: 30, maxAge: 100))
        m.enqueue(Self.entry("a", seq: 1, at: clock.now))
        m.enqueue(Self.entry("b", seq: 2, at: clock.now))
        _ = m.tick(now: clock.now)  // a runs, b waits
        clock.advance(80)
        let retry = m.completed("a", outcome: .failed("x", retryable: true), now: clock.now)
        #expect(finished(retry) == ["a": .expired], "the retry at +110s would pass max_age 100s")
        #expect(dispatched(retry) == ["b"])
        m.enqueue(Self.entry("c", seq: 3, at: clock.now))
        clock.advance(100.5)
        #expect(finished(m.tick(now: clock.now)) == ["c": .expired])
        #expect(TaskState.expired.isDead)
    }

    @Test("cancel: queued at once, running by abort (ends cancelled whatever the invocation reports), finished not at all")
    func cancelInEachState() {
        let clock = TestClock()
        var m = Self.machine(.init(concurrency: 1))
        m.enqueue(Self.entry("run", seq: 1, at: clock.now))
        m.enqueue(Self.entry("wait", seq: 2, at: clock.now))
        _ = m.tick(now: clock.now)
        #expect(m.cancel("wait", now: clock.now) == .cancelled(.finish(id: "wait", state: .cancelled, error: "cancelled while queued")))
        #expect(m.cancel("run", now: clock.now) == .stopping(.abort(id: "run", reason: .cancelled)))
        #expect(m.cancel("run", now: clock.now) == .alreadyStopping)
        #expect(m.heartbeat("run", now: clock.now) == true, "the function hears of the cancellation")
        #expect(finished(m.completed("run", outcome: .succeeded, now: clock.now)) == ["run": .cancelled])
        #expect(m.cancel("run", now: clock.now) == .notActive)
        #expect(m.cancel("unknown", now: clock.now) == .notActive)
    }

    @Test("cancel during a retry's backoff and during a timeout abort")
    func cancelWhileBackingOffOrAborting() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 2, timeout: 5, retries: 3, backoff: 10, maxBackoff: 10, maxAge: 3600))
        m.enqueue(Self.entry("a", seq: 1, at: clock.now))
        m.enqueue(Self.entry("b", seq: 2, at: clock.now))
        _ = m.tick(now: clock.now)
        _ = m.completed("a", outcome: .failed("x", retryable: true), now: clock.now)  // a backs off 10s
        if case .cancelled(.finish(_, .cancelled, _)) = m.cancel("a", now: clock.now) {} else { Issue.record("a should cancel at once") }
        clock.advance(5)
        #expect(m.tick(now: clock.now) == [.abort(id: "b", reason: .timeout)])
        #expect(m.cancel("b", now: clock.now) == .alreadyStopping, "already being stopped")
        #expect(finished(m.completed("b", outcome: .aborted, now: clock.now)) == ["b": .cancelled])
    }

    @Test("rate limit: starts per second follow the token bucket")
    func rateLimit() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 100, timeout: 60, rate: 2))
        for i in 1...10 { m.enqueue(Self.entry("t\(i)", seq: Int64(i), at: clock.now)) }
        #expect(dispatched(m.tick(now: clock.now)).count == 2, "a burst of the rate")
        #expect(dispatched(m.tick(now: clock.now)).isEmpty)
        clock.advance(0.5)
        #expect(dispatched(m.tick(now: clock.now)) == ["t3"])
        clock.advance(1.0)
        #expect(dispatched(m.tick(now: clock.now)) == ["t4", "t5"])
    }

    @Test("throttled attempts do not use up attempts and back off")
    func throttling() {
        var clock = TestClock()
        var m = Self.machine(.init(concurrency: 1, timeout: 60, retries: 0, backoff: 1, maxBackoff: 8, maxAge: 3600))
        m.enqueue(Self.entry("t", seq: 1, at: clock.now))
        for n in 1...3 {
            let started = m.tick(now: clock.now)
            if case .dispatch(let d)? = started.first { #expect(d.attempt == 1) } else { Issue.record("should start") }
            let actions = m.completed("t", outcome: .throttled("queue full"), now: clock.now)
            guard case .requeue(_, 0, let throttles, let notBefore, _)? = actions.first else {
                Issue.record("expected requeue, got \(actions)")
                return
            }
            #expect(throttles == n)
            clock.advance(notBefore - clock.now)
        }
        _ = m.tick(now: clock.now)
        #expect(finished(m.completed("t", outcome: .succeeded, now: clock.now)) == ["t": .succeeded])
    }

    @Test("tasks found in the store at start-up queue again; a running one runs with its next attempt number")
    func restore() {
        let clock = TestClock()
        var m = Self.machine()
        var interrupted = Self.entry("was-running", seq: 1, at: clock.now - 10)
        interrupted.attempt = 1
        m.enqueue(interrupted)
        m.enqueue(Self.entry("was-queued", seq: 2, at: clock.now - 5))
        let actions = m.tick(now: clock.now)
        let attempts = Dictionary(uniqueKeysWithValues: actions.compactMap { if case .dispatch(let d) = $0 { (d.id, d.attempt) } else { nil } })
        #expect(attempts == ["was-running": 2, "was-queued": 1])
    }

    @Test("functions have separate budgets")
    func separateBudgets() {
        let clock = TestClock()
        var m = Self.machine(.init(concurrency: 1))
        m.configure(function: "g", settings: .init(concurrency: 1))
        m.enqueue(Self.entry("f1", seq: 1, at: clock.now))
        m.enqueue(Self.entry("f2", seq: 2, at: clock.now))
        m.enqueue(Self.entry("g1", seq: 3, at: clock.now, function: "g"))
        #expect(Set(dispatched(m.tick(now: clock.now))) == ["f1", "g1"])
    }
}
