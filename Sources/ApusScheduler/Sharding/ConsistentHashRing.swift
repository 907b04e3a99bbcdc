/// A consistent-hash ring over instance ids, for sharding: each gateway worker (and later each gateway node) hashes
/// its own identity onto the ring and talks to the `count` instances that follow it, so a function with many
/// instances is split into bounded, overlapping subsets. When an instance joins or leaves, only the subsets whose
/// arc it falls on change (about count/n of them), so connections elsewhere stay put.
///
/// Every member is placed at `virtualNodes` points to even out arc lengths. Pure value; no I/O.
public struct ConsistentHashRing: Sendable {
    private struct Point: Comparable {
        var hash: UInt64
        var member: Int

        static func < (a: Point, b: Point) -> Bool { a.hash == b.hash ? a.member < b.member : a.hash < b.hash }
    }

    public let members: [String]
    private let points: [Point]

    public init(members: [String], virtualNodes: Int = 64) {
        self.members = members
        var points: [Point] = []
        points.reserveCapacity(members.count * virtualNodes)
        for (index, member) in members.enumerated() {
            let base = Self.hash(member)
            for replica in 0..<virtualNodes {
                points.append(Point(hash: Self.mix(base &+ UInt64(replica) &* 0x9E37_79B9_7F4A_7C15), member: index))
            }
        }
        self.points = points.sorted()
    }

    /// The first `count` distinct members clockwise from `key`'s place on the ring (all members if fewer).
    public func members(forKey key: UInt64, count: Int) -> [String] {
        guard !points.isEmpty, count > 0 else { return [] }
        let wanted = min(count, members.count)
        let start = Self.mix(key)
        // First point at or after `start` (binary search), then walk clockwise.
        var low = 0
        var high = points.count
        while low < high {
            let mid = (low + high) / 2
            if points[mid].hash < start { low = mid + 1 } else { high = mid }
        }
        var chosen: [String] = []
        chosen.reserveCapacity(wanted)
        var seen = Set<Int>()
        var index = low
        while chosen.count < wanted {
            let point = points[index % points.count]
            if seen.insert(point.member).inserted { chosen.append(members[point.member]) }
            index += 1
        }
        return chosen
    }

    /// FNV-1a over the UTF-8 bytes, finished with `mix`.
    public static func hash(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01B3
        }
        return mix(hash)
    }

    /// SplitMix64's finaliser: spreads nearby inputs over the whole range.
    static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A small deterministic random source for the state machine's power-of-two choices (seeded, so tests repeat).
struct SplitMix64: Sendable {
    private var state: UInt64

    init(seed: UInt64) {
        state = seed
    }

    mutating func next() -> UInt64 {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        return ConsistentHashRing.mix(state)
    }

    /// Uniform in 0..<bound (bound > 0); the modulo bias is negligible for instance counts.
    mutating func next(below bound: Int) -> Int {
        Int(next() % UInt64(bound))
    }
}
