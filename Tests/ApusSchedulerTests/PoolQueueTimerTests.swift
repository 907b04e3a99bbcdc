import ApusCore
import ApusScheduler
import Synchronization
import Testing

/// Queued requests on a `ManualClock`: they expire at their deadlines on the pool's single queue timer, with no
/// task per request and no real waiting.
@Suite("pool queue timer on a manual clock")
struct PoolQueueTimerTests {
    final class RecordingWaiter: SlotWaiter {
        let results = Mutex<[String: Result<InstancePool.Lease, ApusError>]>([:])

        func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
            results.withLock { $0[requestID] = result }
        }

        func code(_ requestID: String) -> ApusError.Code? {
            results.withLock { results in
                guard case .failure(let error)? = results[requestID] else { return nil }
                return error.code
            }
        }

        var decided: Set<String> { results.withLock { Set($0.keys) } }
    }

    /// A pool whose only instance never becomes ready during the test: every request queues.
    static func queueingPool(clock: ManualClock) -> InstancePool {
        InstancePoolTests.makePool(concurrency: 1, max: 1, launcher: .init(startDelay: .seconds(3600)), clock: clock).1
    }

    @Test func queuedRequestsExpireAtTheirDeadlinesOnOneTimer() {
        let clock = ManualClock()
        let pool = Self.queueingPool(clock: clock)
        let waiter = RecordingWaiter()
        let start = clock.now
        for (id, seconds) in [("r1", 1.0), ("r2", 2.0)] {
            guard case .queued = pool.acquire(requestID: id, deadline: start.advanced(by: .seconds(seconds)), waiter: waiter) else {
                Issue.record("\(id) was not queued")
                return
            }
        }
        #expect(pool.queueDepth == 2)
        #expect(clock.pendingCount == 1, "one timer for the queue, armed for the earliest deadline")
        // An earlier deadline re-arms the timer rather than adding one.
        _ = pool.acquire(requestID: "r3", deadline: start.advanced(by: .milliseconds(500)), waiter: waiter)
        #expect(clock.pendingCount == 1)

        clock.advance(by: .milliseconds(499))
        #expect(waiter.decided.isEmpty)
        clock.advance(by: .milliseconds(101))
        #expect(waiter.code("r3") == .deadlineExceeded)
        #expect(waiter.decided == ["r3"])
        #expect(pool.queueDepth == 2)
        #expect(clock.pendingCount == 1, "re-armed for r1")

        clock.advance(by: .milliseconds(500))
        #expect(waiter.code("r1") == .deadlineExceeded)
        #expect(waiter.decided == ["r1", "r3"])

        // A request that left the queue is never answered; the timer fires once more and finds the queue empty.
        #expect(pool.cancel(requestID: "r2"))
        clock.advance(by: .seconds(5))
        #expect(waiter.decided == ["r1", "r3"])
        #expect(pool.queueDepth == 0)
        #expect(clock.pendingCount == 0)
    }

    @Test func aRequestWhoseDeadlinePassedIsRefusedWithoutQueueing() {
        let clock = ManualClock()
        let pool = Self.queueingPool(clock: clock)
        let waiter = RecordingWaiter()
        guard case .failed(let error) = pool.acquire(requestID: "late", deadline: clock.now, waiter: waiter) else {
            Issue.record("a request at its deadline was queued")
            return
        }
        #expect(error.code == .deadlineExceeded)
        #expect(clock.pendingCount == 0)
    }

    @Test func manualClockSleepersWakeOnlyWhenTimeIsAdvanced() async throws {
        let clock = ManualClock()
        let woke = Atomic<Bool>(false)
        let sleeper = Task {
            try await clock.sleep(for: .seconds(10))
            woke.store(true, ordering: .relaxed)
        }
        while clock.pendingCount == 0 { await Task.yield() }
        clock.advance(by: .seconds(9))
        let early = woke.load(ordering: .relaxed)
        #expect(!early)
        clock.advance(by: .seconds(1))
        try await sleeper.value
        let late = woke.load(ordering: .relaxed)
        #expect(late)

        let cancelled = Task { try await clock.sleep(for: .seconds(10)) }
        while clock.pendingCount == 0 { await Task.yield() }
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        #expect(clock.pendingCount == 0)
    }

    @Test func manualClockTimersRunInDeadlineOrderAndCanBeCancelled() {
        let clock = ManualClock()
        let fired = Mutex<[String]>([])
        let start = clock.now
        _ = clock.schedule(at: start.advanced(by: .seconds(2))) { fired.withLock { $0.append("b") } }
        _ = clock.schedule(at: start.advanced(by: .seconds(1))) { fired.withLock { $0.append("a") } }
        let dropped = clock.schedule(at: start.advanced(by: .seconds(1))) { fired.withLock { $0.append("x") } }
        dropped.cancel()
        clock.advance(by: .seconds(3))
        #expect(fired.withLock { $0 } == ["a", "b"])
        #expect(clock.now == start.advanced(by: .seconds(3)))
    }
}
