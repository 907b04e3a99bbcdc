import ApusCore
import ApusScheduler
import Synchronization
import Testing

/// Drives the pool state machine with explicit instants: no sockets, no processes, no real time.
@Suite("instance pool state machine")
struct InstancePoolStateMachineTests {
    typealias Machine = InstancePoolStateMachine
    typealias Action = Machine.Action

    /// A manual clock: instants only move when the test says so.
    struct TestClock {
        var now = ContinuousClock.now
        mutating func advance(_ d: Duration) { now = now.advanced(by: d) }
    }

    static func makeMachine(concurrency: Int = 2, min: Int = 0, max: Int = 3, queue: Int = 100, idle: Duration = .seconds(60)) -> Machine {
        let counter = Mutex(0)
        return Machine(
            configuration: .init(concurrency: concurrency, minInstances: min, maxInstances: max, queueLength: queue, idleTimeout: idle),
            makeInstanceID: { counter.withLock { $0 += 1; return "i\($0)" } })
    }

    func dispatched(_ actions: [Action]) -> [String: String] {
        var out: [String: String] = [:]
        for case .dispatch(let r, let i) in actions { out[r] = i }
        return out
    }

    func started(_ actions: [Action]) -> [String] {
        actions.compactMap { if case .startInstance(let id) = $0 { return id } else { return nil } }
    }

    func stopped(_ actions: [Action]) -> [String] {
        actions.compactMap { if case .stopInstance(let id) = $0 { return id } else { return nil } }
    }

    func failures(_ actions: [Action]) -> [String: ApusError.Code] {
        var out: [String: ApusError.Code] = [:]
        for case .fail(let r, let e) in actions { out[r] = e.code }
        return out
    }

    @Test func firstRequestIsHeldWhileAnInstanceStarts() {
        var clock = TestClock()
        var m = Self.makeMachine()
        let a = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        #expect(started(a) == ["i1"])
        #expect(dispatched(a).isEmpty && failures(a).isEmpty)
        #expect(m.queueDepth == 1)
        clock.advance(.milliseconds(80))
        let b = m.instanceReady("i1", now: clock.now)
        #expect(dispatched(b) == ["r1": "i1"])
        #expect(m.queueDepth == 0)
    }

    @Test func slotsNeverExceedConcurrency() {
        let clock = TestClock()
        var m = Self.makeMachine(concurrency: 2, max: 1)
        var actions: [Action] = []
        for i in 0..<10 { actions += m.request("r\(i)", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now) }
        #expect(started(actions) == ["i1"], "max 1 instance")
        actions = m.instanceReady("i1", now: clock.now)
        #expect(dispatched(actions).count == 2)
        #expect(m.instances["i1"]?.inFlight == 2)
        #expect(m.queueDepth == 8)
        // Each release hands exactly one waiter the freed slot, in FIFO order.
        var order: [String] = []
        for _ in 0..<8 {
            let next = m.release(instanceID: "i1", now: clock.now)
            #expect(m.instances["i1"]!.inFlight <= 2)
            order += dispatched(next).keys
        }
        #expect(order == (2..<10).map { "r\($0)" })
    }

    @Test func queueGrowthStartsMoreInstancesUpToMax() {
        let clock = TestClock()
        var m = Self.makeMachine(concurrency: 2, max: 3)
        var actions: [Action] = []
        for i in 0..<20 { actions += m.request("r\(i)", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now) }
        #expect(started(actions).count == 3)
        actions = m.instanceReady("i1", now: clock.now) + m.instanceReady("i2", now: clock.now) + m.instanceReady("i3", now: clock.now)
        #expect(dispatched(actions).count == 6)
        #expect(m.instances.values.allSatisfy { $0.inFlight == 2 })
    }

    @Test func leastOutstandingInstanceIsChosen() {
        let clock = TestClock()
        var m = Self.makeMachine(concurrency: 4, min: 2, max: 2)
        _ = m.ensureMinimum(now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)
        _ = m.instanceReady("i2", now: clock.now)
        var perInstance: [String: Int] = [:]
        for i in 0..<4 {
            for (_, instance) in dispatched(m.request("r\(i)", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)) {
                perInstance[instance, default: 0] += 1
            }
        }
        #expect(perInstance == ["i1": 2, "i2": 2])
    }

    @Test func freeSlotComesWithTheEndpointTheInstanceWasReadyOn() {
        let clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, min: 2, max: 2)
        _ = m.ensureMinimum(now: clock.now)
        _ = m.instanceReady("i1", now: clock.now, endpoint: InstanceEndpoint(address: 0x0AD5_0002, port: 41001))
        _ = m.instanceReady("i2", now: clock.now)  // no endpoint told: the caller looks it up itself
        var taken: [String: String] = [:]
        while let slot = m.takeFreeSlotAndEndpoint(now: clock.now) { taken[slot.instanceID] = slot.endpoint?.description ?? "-" }
        #expect(taken == ["i1": "10.213.0.2:41001", "i2": "-"])
        #expect(m.instances["i1"]?.inFlight == 1 && m.instances["i2"]?.inFlight == 1)
        _ = m.release(instanceID: "i1", now: clock.now)
        #expect(m.takeFreeSlotAndEndpoint(now: clock.now).map { "\($0.instanceID) \($0.endpoint?.description ?? "-")" } == "i1 10.213.0.2:41001")
    }

    @Test func fullQueueIsRefusedAsOverloaded() {
        let clock = TestClock()
        var m = Self.makeMachine(max: 1, queue: 3)
        for i in 0..<3 { _ = m.request("r\(i)", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now) }
        let refused = m.request("r3", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        #expect(failures(refused) == ["r3": .overloaded])
    }

    @Test func queuedRequestsExpireAtTheirDeadline() {
        var clock = TestClock()
        var m = Self.makeMachine(max: 1)
        _ = m.request("short", deadline: clock.now.advanced(by: .milliseconds(100)), now: clock.now)
        _ = m.request("long", deadline: clock.now.advanced(by: .seconds(10)), now: clock.now)
        clock.advance(.milliseconds(150))
        #expect(failures(m.tick(now: clock.now)) == ["short": .deadlineExceeded])
        #expect(m.queueDepth == 1)
        #expect(m.earliestWaiterDeadline == clock.now.advanced(by: .milliseconds(9850)))
        #expect(m.expireWaiters(now: clock.now).isEmpty, "not due yet")
        clock.advance(.seconds(10))
        #expect(failures(m.expireWaiters(now: clock.now)) == ["long": .deadlineExceeded])
        #expect(m.expireWaiters(now: clock.now).isEmpty, "expiring twice is harmless")
        #expect(m.earliestWaiterDeadline == nil)
        let late = m.request("late", deadline: clock.now, now: clock.now)
        #expect(failures(late) == ["late": .deadlineExceeded])
    }

    @Test func startFailureFailsWaitersWhenNothingElseIsComing() {
        let clock = TestClock()
        var m = Self.makeMachine(max: 1)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        _ = m.request("r2", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        let a = m.instanceFailedToStart("i1", error: ApusError(.unavailable, "exit 1"), now: clock.now)
        #expect(failures(a) == ["r1": .unavailable, "r2": .unavailable])
        #expect(m.instances.isEmpty && m.queueDepth == 0)
    }

    @Test func crashedInstanceIsReplacedWhenThereIsDemand() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, max: 1)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)
        _ = m.request("r2", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        clock.advance(.seconds(3))
        let a = m.instanceExited("i1", now: clock.now)
        #expect(started(a) == ["i2"])
        #expect(dispatched(m.instanceReady("i2", now: clock.now)) == ["r2": "i2"])
        #expect(m.release(instanceID: "i1", now: clock.now).isEmpty, "a slot of a dead instance is just dropped")
    }

    @Test func unreachableInstanceIsStoppedAndTheRetryGetsANewOne() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 2, max: 1)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)
        clock.advance(.seconds(3))
        let a = m.instanceUnreachable("i1", now: clock.now)
        #expect(stopped(a) == ["i1"])
        #expect(m.instances["i1"] == nil, "no new work goes to it")
        // The gateway asks again for the same request: it waits for a replacement instead of failing.
        let b = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        #expect(started(b) == ["i2"])
        #expect(dispatched(m.instanceReady("i2", now: clock.now)) == ["r1": "i2"])
        #expect(m.instanceUnreachable("i1", now: clock.now).isEmpty, "a second report changes nothing")
        #expect(m.release(instanceID: "i1", now: clock.now).isEmpty)
    }

    @Test func theAutoscalersFloorStartsInstancesAndKeepsThemFromIdling() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, min: 0, max: 3, idle: .seconds(1))
        #expect(started(m.setDesired(2, now: clock.now)) == ["i1", "i2"])
        _ = m.instanceReady("i1", now: clock.now)
        _ = m.instanceReady("i2", now: clock.now)
        clock.advance(.seconds(5))
        #expect(stopped(m.tick(now: clock.now)).isEmpty, "idle, but the autoscaler wants two")
        #expect(started(m.setDesired(10, now: clock.now)) == ["i3"], "never beyond scale.max")
        _ = m.instanceReady("i3", now: clock.now)
        _ = m.setDesired(0, now: clock.now)
        clock.advance(.seconds(5))
        #expect(stopped(m.tick(now: clock.now)).count == 3, "with the floor at zero idleness stops them")
        #expect(m.takeAdmitted() == 0)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        #expect(m.takeAdmitted() == 1 && m.takeAdmitted() == 0)
    }

    @Test func aRequestThatCannotMakeItsDeadlineIsRefusedAtOnce() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, max: 1)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)
        clock.advance(.seconds(2))
        _ = m.release(instanceID: "i1", serviceTime: .seconds(2), now: clock.now)  // requests take ~2 s
        _ = m.request("r2", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)  // takes the slot
        // Done in about two requests' time (the one in the slot, then its own): 5 s is enough, 3 s is not.
        #expect(m.request("r3", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now).isEmpty, "queued")
        let refused = m.request("r4", deadline: clock.now.advanced(by: .seconds(3)), now: clock.now)
        #expect(failures(refused) == ["r4": .overloaded])
        #expect(m.queueDepth == 1)
    }

    @Test func serviceTimeAverageIsSmoothedOverTickWindows() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 4, max: 1)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)
        _ = m.request("r2", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        #expect(m.averageServiceTime == nil)
        clock.advance(.seconds(1))
        _ = m.release(instanceID: "i1", serviceTime: .seconds(1), now: clock.now)
        _ = m.release(instanceID: "i1", serviceTime: .seconds(3), now: clock.now)
        #expect(m.averageServiceTime == .seconds(2), "the first window's mean")
        _ = m.tick(now: clock.now)
        #expect(m.averageServiceTime == .seconds(2), "kept across the tick")
        _ = m.request("r3", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        _ = m.release(instanceID: "i1", serviceTime: .seconds(7), now: clock.now)
        #expect(m.averageServiceTime == .seconds(3), "0.8 × 2 s + 0.2 × 7 s")
        _ = m.tick(now: clock.now)
        _ = m.tick(now: clock.now)
        #expect(m.averageServiceTime == .seconds(3), "an empty window changes nothing")
    }

    @Test func coldStartsAreWaitedForNotShed() {
        let clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, max: 1)
        #expect(m.expectedCompletion(position: 5) == nil, "nothing known yet")
        #expect(failures(m.request("r1", deadline: clock.now.advanced(by: .milliseconds(50)), now: clock.now)).isEmpty)
    }

    @Test func codelShedsWhileQueueDelayStaysAboveTarget() {
        var clock = TestClock()
        var m = Machine(configuration: .init(concurrency: 1, minInstances: 0, maxInstances: 1, queueLength: 100, idleTimeout: .seconds(60),
                                             shedding: .init(target: .milliseconds(100), interval: .milliseconds(500))))
        _ = m.request("r0", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        let first = m.instances.keys.first!
        _ = m.instanceReady(first, now: clock.now)
        // Each request waits 300 ms in the queue before it gets the slot: above target.
        for i in 1...4 {
            _ = m.request("r\(i)", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
            clock.advance(.milliseconds(300))
            _ = m.release(instanceID: first, now: clock.now)
        }
        #expect(m.isShedding, "delays above target for longer than the interval")
        _ = m.request("busy", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        #expect(failures(m.request("shed", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)) == ["shed": .overloaded])
        // Once the queue has drained, shedding ends.
        clock.advance(.milliseconds(10))
        _ = m.release(instanceID: first, now: clock.now)
        _ = m.tick(now: clock.now)
        #expect(!m.isShedding)
    }

    @Test func crashBelowMinimumIsReplacedWithoutDemand() {
        var clock = TestClock()
        var m = Self.makeMachine(min: 1)
        #expect(started(m.ensureMinimum(now: clock.now)) == ["i1"])
        _ = m.instanceReady("i1", now: clock.now)
        clock.advance(.seconds(10))
        #expect(started(m.instanceExited("i1", now: clock.now)) == ["i2"])
    }

    @Test func idleInstancesAboveMinimumStop() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, min: 1, max: 3, idle: .seconds(30))
        for i in 0..<3 { _ = m.request("r\(i)", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now) }
        for id in ["i1", "i2", "i3"] { _ = m.instanceReady(id, now: clock.now) }
        for id in ["i1", "i2", "i3"] { _ = m.release(instanceID: id, now: clock.now) }
        clock.advance(.seconds(29))
        #expect(stopped(m.tick(now: clock.now)).isEmpty)
        clock.advance(.seconds(2))
        let a = m.tick(now: clock.now)
        #expect(stopped(a).count == 2, "keeps scale.min = 1")
        #expect(m.instances.count == 1)
        clock.advance(.seconds(600))
        #expect(stopped(m.tick(now: clock.now)).isEmpty)
    }

    @Test func busyInstancesAreNotStoppedForIdleness() {
        var clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, idle: .seconds(1))
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(60)), now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)
        clock.advance(.seconds(10))
        #expect(stopped(m.tick(now: clock.now)).isEmpty)
        _ = m.release(instanceID: "i1", now: clock.now)
        clock.advance(.seconds(2))
        #expect(stopped(m.tick(now: clock.now)) == ["i1"])
    }

    @Test func closeDrainsBusyInstancesAndFailsWaiters() {
        let clock = TestClock()
        var m = Self.makeMachine(concurrency: 1, max: 2)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        _ = m.request("r2", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        _ = m.instanceReady("i1", now: clock.now)  // r1 on i1; i2 still starting; r2 waiting
        let a = m.close(reason: ApusError(.unavailable, "shutting down"))
        #expect(failures(a) == ["r2": .unavailable])
        #expect(stopped(a) == ["i2"], "starting instance stopped, busy one drains")
        #expect(m.instances["i1"]?.state == .draining)
        #expect(failures(m.request("r3", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)) == ["r3": .unavailable])
        #expect(stopped(m.release(instanceID: "i1", now: clock.now)) == ["i1"])
        #expect(m.instances.isEmpty)
        #expect(stopped(m.instanceReady("i2", now: clock.now)) == ["i2"], "a late ready of a forgotten instance stops it")
    }

    @Test func cancelledWaiterLeavesTheQueue() {
        let clock = TestClock()
        var m = Self.makeMachine(max: 1)
        _ = m.request("r1", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        _ = m.request("r2", deadline: clock.now.advanced(by: .seconds(5)), now: clock.now)
        m.requestCancelled("r1")
        #expect(dispatched(m.instanceReady("i1", now: clock.now)) == ["r2": "i1"])
    }

    @Test func minimumFollowsReconfiguration() {
        let clock = TestClock()
        var m = Self.makeMachine(min: 0)
        #expect(m.ensureMinimum(now: clock.now).isEmpty)
        let a = m.reconfigure(.init(concurrency: 2, minInstances: 2, maxInstances: 3, queueLength: 100, idleTimeout: .seconds(60)), now: clock.now)
        #expect(started(a).count == 2)
    }
}

@Suite("instance pool start backoff")
struct InstancePoolBackoffTests {
    typealias Machine = InstancePoolStateMachine

    func started(_ actions: [Machine.Action]) -> Int {
        actions.filter { if case .startInstance = $0 { return true } else { return false } }.count
    }

    @Test func failedStartsBackOffInsteadOfLooping() {
        var now = ContinuousClock.now
        var m = InstancePoolStateMachineTests.makeMachine(min: 1)
        #expect(started(m.ensureMinimum(now: now)) == 1)
        _ = m.instanceFailedToStart("i1", error: ApusError(.unavailable, "exit 1"), now: now)
        #expect(started(m.tick(now: now)) == 0, "no immediate restart")
        // A request during the backoff waits for the next attempt instead of starting one now.
        #expect(m.request("r1", deadline: now.advanced(by: .seconds(30)), now: now).isEmpty)
        #expect(m.queueDepth == 1)
        now = now.advanced(by: .milliseconds(600))
        #expect(started(m.tick(now: now)) == 1, "retried after 0.5 s")
        let failed = m.instanceFailedToStart("i2", error: ApusError(.unavailable, "exit 1"), now: now)
        #expect(failed == [.fail(requestID: "r1", ApusError(.unavailable, "exit 1"))], "the waiter gets the start error")
        _ = m.request("r2", deadline: now.advanced(by: .seconds(30)), now: now)
        now = now.advanced(by: .milliseconds(600))
        #expect(started(m.tick(now: now)) == 0, "second backoff is 1 s")
        now = now.advanced(by: .milliseconds(500))
        #expect(started(m.tick(now: now)) == 1)
        let served = m.instanceReady("i3", now: now)
        #expect(served == [.dispatch(requestID: "r2", instanceID: "i3")])
    }

    @Test func crashRightAfterReadyCountsAsFailedStart() {
        var now = ContinuousClock.now
        var m = InstancePoolStateMachineTests.makeMachine(min: 1)
        _ = m.ensureMinimum(now: now)
        _ = m.instanceReady("i1", now: now)
        now = now.advanced(by: .milliseconds(100))
        #expect(started(m.instanceExited("i1", now: now)) == 0, "crash loop is slowed down")
        now = now.advanced(by: .seconds(1))
        #expect(started(m.tick(now: now)) == 1)
        _ = m.instanceReady("i2", now: now)
        now = now.advanced(by: .seconds(60))
        #expect(started(m.instanceExited("i2", now: now)) == 1, "a long-lived instance's crash is replaced at once")
    }
}
