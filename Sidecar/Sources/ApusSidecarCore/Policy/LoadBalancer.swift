/// How an upstream's requests are spread over its endpoints.
public enum BalancePolicy: String, Sendable, CaseIterable {
    /// Smooth weighted round robin (equal weights: plain rotation).
    case roundRobin = "round_robin"
    /// Power of two choices: two random candidates, the one with fewer requests in flight wins.
    case leastRequest = "least_request"
    /// A hash ring over the endpoints, keyed by a request header; the same key keeps the same endpoint while it
    /// stays available. Requests without the header fall back to round robin.
    case consistentHash = "consistent_hash"
}

/// Picks one endpoint among candidates. Pure state (no clock, no locks): the caller holds the upstream's lock,
/// passes the candidates (indices into its endpoint list: healthy, not ejected, not yet tried by this request)
/// and their in-flight counts.
public struct LoadBalancer: Sendable {
    public let policy: BalancePolicy
    /// Smooth weighted round robin's running weights, by endpoint index.
    private var current: [Int] = []
    private var ring = HashRing(ids: [], weights: [])
    private var random: XorShiftRandom

    public init(policy: BalancePolicy, seed: UInt64 = UInt64.random(in: 1...UInt64.max)) {
        self.policy = policy
        self.random = XorShiftRandom(seed: seed)
    }

    /// Tells the balancer the endpoint list changed (ids and weights by index).
    public mutating func endpointsChanged(ids: [String], weights: [Int]) {
        current = Array(repeating: 0, count: ids.count)
        if policy == .consistentHash { ring = HashRing(ids: ids, weights: weights) }
    }

    /// The chosen endpoint index, or nil when there is no candidate.
    public mutating func pick(candidates: [Int], weights: [Int], active: [Int], hashKey: String?) -> Int? {
        guard !candidates.isEmpty else { return nil }
        if candidates.count == 1 { return candidates[0] }
        switch policy {
        case .roundRobin:
            return smoothWeighted(candidates, weights)
        case .leastRequest:
            let first = Int(random.next() % UInt64(candidates.count))
            var second = Int(random.next() % UInt64(candidates.count - 1))
            if second >= first { second += 1 }
            let a = candidates[first], b = candidates[second]
            return active[b] < active[a] ? b : a
        case .consistentHash:
            guard let hashKey else { return smoothWeighted(candidates, weights) }
            return ring.lookup(hashKey) { candidates.contains($0) } ?? smoothWeighted(candidates, weights)
        }
    }

    private mutating func smoothWeighted(_ candidates: [Int], _ weights: [Int]) -> Int {
        if current.count < weights.count { current += Array(repeating: 0, count: weights.count - current.count) }
        var total = 0
        var best = candidates[0]
        for index in candidates {
            let weight = max(weights[index], 1)
            current[index] += weight
            total += weight
            if current[index] > current[best] { best = index }
        }
        current[best] -= total
        return best
    }
}

/// A consistent-hash ring with virtual nodes (weight/100 × 64 points per endpoint, at least 8).
public struct HashRing: Sendable {
    private var points: [(hash: UInt64, index: Int)] = []

    public init(ids: [String], weights: [Int]) {
        for (index, id) in ids.enumerated() {
            let replicas = max(8, 64 * max(weights[index], 1) / 100)
            for replica in 0..<replicas {
                points.append((Self.hash("\(id)#\(replica)"), index))
            }
        }
        points.sort { $0.hash < $1.hash }
    }

    /// The first endpoint clockwise from the key's hash that `accept`s.
    public func lookup(_ key: String, accept: (Int) -> Bool) -> Int? {
        guard !points.isEmpty else { return nil }
        let h = Self.hash(key)
        var lo = 0, hi = points.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if points[mid].hash < h { lo = mid + 1 } else { hi = mid }
        }
        for step in 0..<points.count {
            let index = points[(lo + step) % points.count].index
            if accept(index) { return index }
        }
        return nil
    }

    /// FNV-1a 64 with a final avalanche (splitmix64), stable across runs and platforms.
    public static func hash(_ s: String) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in s.utf8 {
            h ^= UInt64(byte)
            h = h &* 0x100_0000_01b3
        }
        h ^= h >> 30
        h = h &* 0xbf58_476d_1ce4_e5b9
        h ^= h >> 27
        h = h &* 0x94d0_49bb_1331_11eb
        h ^= h >> 31
        return h
    }
}
