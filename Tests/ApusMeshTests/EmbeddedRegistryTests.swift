import ApusMesh
import Logging
import Synchronization
import Testing

/// A clock the test moves by hand.
final class ManualClock: Sendable {
    private let instant = Mutex(ContinuousClock.now)
    var now: ContinuousClock.Instant { instant.withLock { $0 } }
    func advance(by duration: Duration) { instant.withLock { $0 = $0.advanced(by: duration) } }
}

@Suite("embedded registry")
struct EmbeddedRegistryTests {
    let clock = ManualClock()
    var registry: EmbeddedRegistry {
        let clock = self.clock
        return EmbeddedRegistry(now: { clock.now }, initialIndex: 0, logger: Logger(label: "test"))
    }

    func endpoint(_ id: String, port: Int = 9000) -> ServiceEndpoint {
        ServiceEndpoint(id: id, address: "127.0.0.1", port: port, protocol: "grpc")
    }

    @Test func watchSeesEachChange() async throws {
        let registry = self.registry
        var changes = registry.watch("orders").makeAsyncIterator()
        #expect(try await changes.next() == [])
        let a = try await registry.register(service: "orders", endpoint: endpoint("a"), ttlSeconds: 5)
        #expect(try await changes.next()?.map(\.id) == ["a"])
        _ = try await registry.register(service: "orders", endpoint: endpoint("b"), ttlSeconds: 2)
        #expect(try await changes.next()?.map(\.id) == ["a", "b"])
        try await registry.setHealth(a, healthy: false)
        #expect(try await changes.next()?.map(\.healthy) == [false, true])
        // b expires (2 s), a is kept alive by a heartbeat.
        clock.advance(by: .seconds(1))
        try await registry.heartbeat(a)
        clock.advance(by: .seconds(1))
        #expect(registry.sweep() == 1)
        #expect(try await changes.next()?.map(\.id) == ["a"])
        try await registry.deregister(a)
        #expect(try await changes.next() == [])
        #expect(try await registry.services().isEmpty)
        await #expect(throws: RegistryError.leaseNotFound(a.leaseID)) { try await registry.heartbeat(a) }
    }

    @Test func longPollAnswersOnChangeOrTimeout() async throws {
        let registry = self.registry
        let first = try await registry.snapshot("orders")
        #expect(first.index == 0 && first.endpoints.isEmpty)
        // Nothing changes: the current snapshot after the wait.
        let unchanged = try await registry.waitForChange("orders", from: first.index, timeout: .milliseconds(50))
        #expect(unchanged == first)
        async let changed = registry.waitForChange("orders", from: first.index, timeout: .seconds(10))
        try await Task.sleep(for: .milliseconds(20))
        _ = try await registry.register(service: "orders", endpoint: endpoint("a"), ttlSeconds: 5)
        let snapshot = try await changed
        #expect(snapshot.index != first.index)
        #expect(snapshot.endpoints.map(\.endpoint.id) == ["a"])
        #expect(snapshot.endpoints.first?.expiresInSeconds == 5)
        // A stale index (say from before a restart) answers at once.
        let stale = try await registry.waitForChange("orders", from: snapshot.index + 1000, timeout: .seconds(10))
        #expect(stale.index == snapshot.index)
    }

    @Test func stoppingEndsEveryOpenWatchWithoutTakingTheLockTwice() async throws {
        // Watches open on several services (as sidecars and long-polls hold them) when the daemon stops: `run`
        // ends each one. Finishing a watch runs its termination handler, which takes the registry's lock; this
        // crashed with "Recursive call to lock Mutex" when `run` finished them under that lock.
        let registry = self.registry
        _ = try await registry.register(service: "orders", endpoint: endpoint("a"), ttlSeconds: 60)
        let runner = Task { await registry.run(interval: .milliseconds(5)) }
        let watches = (0..<6).map { registry.snapshotChanges($0 % 2 == 0 ? "orders" : "other\($0)") }
        let readers = watches.map { stream in
            Task { () -> Int in
                var seen = 0
                for try await _ in stream { seen += 1 }
                return seen
            }
        }
        // One reader goes away before the stop (its stream terminates from the reader's side).
        readers[5].cancel()
        try await Task.sleep(for: .milliseconds(20))
        runner.cancel()
        await runner.value
        for reader in readers.prefix(5) {
            #expect(try await reader.value == 1, "each watch saw its first snapshot, then ended")
        }
        // A watch opened after the stop gets the current snapshot and ends at once.
        var late = registry.snapshotChanges("orders").makeAsyncIterator()
        #expect(try await late.next()?.endpoints.map(\.endpoint.id) == ["a"])
        #expect(try await late.next() == nil)
    }

    @Test func keeperRegistersAgainAfterTheLeaseIsLost() async throws {
        let registry = self.registry
        let keeper = RegistrationKeeper(registry: registry, service: "orders", endpoint: endpoint("k"), ttlSeconds: 1, logger: Logger(label: "test"))
        try await keeper.startAndWait()
        let lease = try #require(await keeper.lease)
        // The registry forgets it (as a restarted apusd or etcd would): the next heartbeat registers again.
        try await registry.deregister(lease)
        var registered = false
        for _ in 0..<100 where !registered {
            try await Task.sleep(for: .milliseconds(20))
            registered = await keeper.registrations == 2
        }
        #expect(registered)
        #expect(try await registry.resolve("orders").map(\.id) == ["k"])
        await keeper.setHealthy(false)
        #expect(try await registry.resolve("orders").first?.healthy == false)
        await keeper.stop()
        #expect(try await registry.resolve("orders").isEmpty)
    }
}
