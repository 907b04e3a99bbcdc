import ApusCore
import ApusRuntime
import ApusScheduler
import Foundation
import Logging
import Synchronization
import Testing

/// The pool wrapper around the state machine, driven through a fake `InstanceLauncher` (no processes).
@Suite("instance pool with a fake launcher")
struct InstancePoolTests {
    final class FakeHandle: InstanceHandle {
        let instanceID: String
        let port: Int
        let pid: Int32 = 1
        let stopped = Atomic<Bool>(false)

        init(instanceID: String, port: Int) {
            self.instanceID = instanceID
            self.port = port
        }

        func stop(grace: Duration) async { stopped.store(true, ordering: .relaxed) }
    }

    final class FakeLauncher: InstanceLauncher {
        struct State {
            var launches = 0
            var handles: [FakeHandle] = []
            var exits: [String: @Sendable (InstanceExit) -> Void] = [:]
        }

        let state = Mutex(State())
        let startDelay: Duration
        let failWith: ApusError?

        init(startDelay: Duration = .milliseconds(20), failWith: ApusError? = nil) {
            self.startDelay = startDelay
            self.failWith = failWith
        }

        func launch(_ spec: InstanceSpec, onExit: @escaping @Sendable (InstanceExit) -> Void) async throws(ApusError) -> any InstanceHandle {
            let number = state.withLock { $0.launches += 1; return $0.launches }
            try? await Task.sleep(for: startDelay)
            if let failWith { throw failWith }
            let handle = FakeHandle(instanceID: spec.instanceID, port: 40000 + number)
            state.withLock {
                $0.handles.append(handle)
                $0.exits[spec.instanceID] = onExit
            }
            return handle
        }

        /// Simulates the process of an instance ending on its own.
        func crash(_ instanceID: String) {
            let exit = state.withLock { $0.exits.removeValue(forKey: instanceID) }
            exit?(InstanceExit(status: 1, signal: nil))
        }
    }

    static func makePool(concurrency: Int = 1, max: Int = 1, queue: Int = 10, launcher: FakeLauncher,
                         clock: any SchedulingClock = SystemClock()) -> (Scheduler, InstancePool) {
        let manifest = FunctionManifest(name: "f", runtime: .python3, handler: "main.handler", concurrency: concurrency,
                                        scale: .init(min: 0, max: max), timeout: .seconds(5))
        let version = FunctionVersion(function: "f", number: 1, codeDigest: "sha256:x", manifest: manifest, createdAt: Date())
        let catalog = FunctionCatalog()
        let release = Release(function: "f", weights: [.init(version: 1, weight: 100)], updatedAt: Date())
        catalog.update(.init(record: FunctionRecord(name: "f", latestVersion: 1, release: release, createdAt: Date(), updatedAt: Date()),
                             versions: [version]))
        let scheduler = Scheduler(
            configuration: .init(queueLength: queue, idleTimeout: .seconds(60), stopGrace: .milliseconds(10)),
            catalog: catalog, launcher: launcher,
            codeDirectory: { _ in URL(fileURLWithPath: "/nonexistent") }, logger: Logger(label: "test"), clock: clock)
        return (scheduler, scheduler.pool(for: version))
    }

    @Test func firstRequestWaitsForTheInstanceToStart() async throws {
        let launcher = FakeLauncher()
        let (_, pool) = Self.makePool(launcher: launcher)
        let lease = try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(5)))
        #expect(lease.port == 40001)
        #expect(launcher.state.withLock { $0.launches } == 1)
        #expect(pool.instances().first?.inFlight == 1)
        pool.release(lease)
        #expect(pool.instances().first?.inFlight == 0)
    }

    @Test func secondRequestWaitsForTheSlot() async throws {
        let launcher = FakeLauncher()
        let (_, pool) = Self.makePool(concurrency: 1, max: 1, launcher: launcher)
        let first = try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(5)))
        let second = Task { try await pool.acquire(requestID: "r2", deadline: .now.advanced(by: .seconds(5))) }
        try await Task.sleep(for: .milliseconds(50))
        #expect(pool.queueDepth == 1)
        pool.release(first)
        let lease = try await second.value
        #expect(lease.instanceID == first.instanceID)
        #expect(launcher.state.withLock { $0.launches } == 1)
    }

    @Test func tryAcquireTakesOnlyAFreeSlotAndNeverQueuesOrStarts() async throws {
        let launcher = FakeLauncher()
        let (_, pool) = Self.makePool(concurrency: 1, max: 2, launcher: launcher)
        #expect(pool.tryAcquire() == nil)  // nothing running: no instance is started for it
        #expect(launcher.state.withLock { $0.launches } == 0)
        #expect(pool.queueDepth == 0)
        let first = try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(5)))
        #expect(pool.tryAcquire() == nil)  // the only slot is taken
        #expect(pool.queueDepth == 0)
        pool.release(first)
        let second = try #require(pool.tryAcquire())
        #expect(second.instanceID == first.instanceID)
        #expect(pool.instances().first?.inFlight == 1)
        pool.release(second)
        #expect(pool.instances().first?.inFlight == 0)
    }

    @Test func startFailureFailsTheWaiter() async {
        let launcher = FakeLauncher(failWith: ApusError(.unavailable, "exit 1 before ready"))
        let (_, pool) = Self.makePool(launcher: launcher)
        await #expect(throws: ApusError(.unavailable, "exit 1 before ready")) {
            try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(5)))
        }
    }

    @Test func queuedRequestTimesOutAtItsDeadline() async throws {
        let launcher = FakeLauncher()
        let (_, pool) = Self.makePool(launcher: launcher)
        let held = try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(5)))
        let started = ContinuousClock.now
        await #expect(throws: ApusError.self) {
            try await pool.acquire(requestID: "r2", deadline: .now.advanced(by: .milliseconds(100)))
        }
        #expect(ContinuousClock.now - started >= .milliseconds(100))
        #expect(pool.queueDepth == 0)
        pool.release(held)
    }

    @Test func cancelledWaiterLeavesTheQueue() async throws {
        let launcher = FakeLauncher()
        let (_, pool) = Self.makePool(launcher: launcher)
        let held = try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(5)))
        let waiter = Task { try await pool.acquire(requestID: "r2", deadline: .now.advanced(by: .seconds(5))) }
        try await Task.sleep(for: .milliseconds(50))
        waiter.cancel()
        await #expect(throws: ApusError.self) { try await waiter.value }
        #expect(pool.queueDepth == 0)
        pool.release(held)
        #expect(pool.instances().first?.inFlight == 0, "the slot was not handed to the cancelled request")
    }

    @Test func crashedInstanceIsReplacedForWaitingRequests() async throws {
        let launcher = FakeLauncher()
        let (_, pool) = Self.makePool(launcher: launcher)
        let first = try await pool.acquire(requestID: "r1", deadline: .now.advanced(by: .seconds(10)))
        try await Task.sleep(for: .seconds(2.1))  // past the crash-loop window
        let waiter = Task { try await pool.acquire(requestID: "r2", deadline: .now.advanced(by: .seconds(10))) }
        try await Task.sleep(for: .milliseconds(50))
        launcher.crash(first.instanceID)
        let second = try await waiter.value
        #expect(second.instanceID != first.instanceID)
        #expect(launcher.state.withLock { $0.launches } == 2)
    }
}
