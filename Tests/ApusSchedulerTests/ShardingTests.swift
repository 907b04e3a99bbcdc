import ApusCore
import ApusScheduler
import Synchronization
import Testing

/// The consistent-hash ring, and the state machine's instance choice with shards and power-of-two choices.
@Suite("sharding and instance choice")
struct ShardingTests {
    typealias Machine = InstancePoolStateMachine

    static let members = (1...40).map { "i-\($0)" }

    @Test func ringGivesDistinctMembersAndIsDeterministic() {
        let ring = ConsistentHashRing(members: Self.members)
        let subset = ring.members(forKey: 42, count: 8)
        #expect(subset.count == 8)
        #expect(Set(subset).count == 8)
        #expect(ConsistentHashRing(members: Self.members.reversed()).members(forKey: 42, count: 8).sorted() == subset.sorted())
        #expect(ring.members(forKey: 42, count: 100).count == Self.members.count)
        #expect(ConsistentHashRing(members: []).members(forKey: 1, count: 3).isEmpty)
    }

    @Test func ringSpreadsKeysEvenly() {
        let ring = ConsistentHashRing(members: Self.members)
        var owners: [String: Int] = [:]
        let keys = 40_000
        for key in 0..<keys {
            owners[ring.members(forKey: ConsistentHashRing.hash("key-\(key)"), count: 1)[0], default: 0] += 1
        }
        let expected = Double(keys) / Double(Self.members.count)
        #expect(owners.count == Self.members.count)
        // 64 virtual nodes per member keep every member within ±50% of its fair share.
        for (_, count) in owners {
            #expect(Double(count) > expected * 0.5 && Double(count) < expected * 1.5)
        }
    }

    @Test func removingAMemberMovesOnlyItsKeys() {
        let before = ConsistentHashRing(members: Self.members)
        let after = ConsistentHashRing(members: Self.members.filter { $0 != "i-7" })
        var moved = 0
        let keys = 10_000
        for key in 0..<keys {
            let hash = ConsistentHashRing.hash("key-\(key)")
            let old = before.members(forKey: hash, count: 1)[0]
            let new = after.members(forKey: hash, count: 1)[0]
            if old != new {
                #expect(old == "i-7")  // only keys i-7 owned change owner
                moved += 1
            }
        }
        #expect(moved > 0 && moved < keys / 10)
    }

    static func machine(instances: Int, concurrency: Int, shardSize: Int) -> (Machine, ContinuousClock.Instant) {
        let counter = Mutex(0)
        var m = Machine(
            configuration: .init(concurrency: concurrency, minInstances: instances, maxInstances: instances, queueLength: 100,
                                 idleTimeout: .seconds(600), shardSize: shardSize),
            makeInstanceID: { counter.withLock { $0 += 1; return "i\($0)" } })
        let now = ContinuousClock.now
        for case .startInstance(let id) in m.ensureMinimum(now: now) {
            _ = m.instanceReady(id, now: now)
        }
        return (m, now)
    }

    @Test func aShardKeyStaysOnItsSubsetWhileItHasFreeSlots() {
        let (machine, now) = Self.machine(instances: 20, concurrency: 100, shardSize: 4)
        var m = machine
        #expect(m.readyCount == 20)
        var usedByA = Set<String>()
        var usedByB = Set<String>()
        for _ in 0..<200 {
            usedByA.insert(m.takeFreeSlot(now: now, shard: 1111)!)
            usedByB.insert(m.takeFreeSlot(now: now, shard: 987_654_321)!)
        }
        #expect(usedByA.count == 4)
        #expect(usedByB.count == 4)
        // Without a shard key, requests spread over every instance.
        var unsharded = Set<String>()
        for _ in 0..<200 { unsharded.insert(m.takeFreeSlot(now: now)!) }
        #expect(unsharded.count == 20)
    }

    @Test func aFullShardSpillsToTheOtherInstances() {
        let (machine, now) = Self.machine(instances: 10, concurrency: 1, shardSize: 3)
        var m = machine
        var used = Set<String>()
        for _ in 0..<10 {
            guard let id = m.takeFreeSlot(now: now, shard: 7) else { Issue.record("no slot"); return }
            used.insert(id)
        }
        #expect(used.count == 10)  // every slot, shard or not, before anyone has to queue
        #expect(m.takeFreeSlot(now: now, shard: 7) == nil)
    }

    @Test func belowTheShardSizeEveryInstanceServesEveryKey() {
        let (machine, now) = Self.machine(instances: 3, concurrency: 100, shardSize: 4)
        var m = machine
        var used = Set<String>()
        for _ in 0..<30 { used.insert(m.takeFreeSlot(now: now, shard: 5)!) }
        #expect(used.count == 3)
    }

    @Test func powerOfTwoChoicesKeepsLoadBalancedAtScale() {
        // 64 instances: above the threshold where the machine samples two instead of scanning all.
        let (machine, now) = Self.machine(instances: 64, concurrency: 1000, shardSize: 0)
        var m = machine
        for _ in 0..<6400 { _ = m.takeFreeSlot(now: now) }
        let loads = m.instances.values.map(\.inFlight)
        #expect(loads.reduce(0, +) == 6400)
        // Two choices keep the spread tight: max - min stays small (one random choice would spread about ±30).
        #expect(loads.max()! - loads.min()! <= 6)
    }

    @Test func powerOfTwoChoicesNeverPicksAFullInstance() {
        let (machine, now) = Self.machine(instances: 32, concurrency: 2, shardSize: 0)
        var m = machine
        var taken = 0
        while m.takeFreeSlot(now: now) != nil { taken += 1 }
        #expect(taken == 64)
        #expect(m.instances.values.allSatisfy { $0.inFlight == 2 })
    }

    @Test func drainingInstancesLeaveTheShardsAtOnce() {
        let (machine, now) = Self.machine(instances: 12, concurrency: 10, shardSize: 4)
        var m = machine
        let first = m.takeFreeSlot(now: now, shard: 99)!
        _ = m.close(reason: ApusError(.unavailable, "retired"))
        #expect(m.instances[first]?.state == .draining)
        #expect(m.takeFreeSlot(now: now, shard: 99) == nil)
    }
}
