import Foundation

/// How a function's traffic is split across its versions. Weights are percentages summing to 100.
public struct Release: Codable, Hashable, Sendable {
    public struct Weight: Codable, Hashable, Sendable {
        public var version: Int
        public var weight: Int

        public init(version: Int, weight: Int) {
            self.version = version
            self.weight = weight
        }
    }

    public var function: String
    public var weights: [Weight]
    public var updatedAt: Date

    public init(function: String, weights: [Weight], updatedAt: Date) {
        self.function = function
        self.weights = weights
        self.updatedAt = updatedAt
    }

    /// Validates a proposed split against the versions that exist.
    public static func validate(weights: [Weight], existingVersions: Set<Int>) throws(ApusError) {
        guard !weights.isEmpty else {
            throw ApusError(.badRequest, "a release needs at least one version")
        }
        var seen = Set<Int>()
        for w in weights {
            guard existingVersions.contains(w.version) else {
                throw ApusError(.notFound, "version \(w.version) does not exist")
            }
            guard seen.insert(w.version).inserted else {
                throw ApusError(.badRequest, "version \(w.version) is listed twice")
            }
            guard (0...100).contains(w.weight) else {
                throw ApusError(.badRequest, "weight of version \(w.version) must be between 0 and 100 (got \(w.weight))")
            }
        }
        let total = weights.reduce(0) { $0 + $1.weight }
        guard total == 100 else {
            throw ApusError(.badRequest, "weights must sum to 100 (got \(total))")
        }
    }

    /// Picks a version for one request. `roll` is uniform in 0..<100 (injected so tests are deterministic).
    public func pickVersion(roll: Int) -> Int? {
        var remaining = roll
        for w in weights where w.weight > 0 {
            if remaining < w.weight { return w.version }
            remaining -= w.weight
        }
        return weights.last(where: { $0.weight > 0 })?.version
    }

    public func pickVersion<G: RandomNumberGenerator>(using generator: inout G) -> Int? {
        pickVersion(roll: Int.random(in: 0..<100, using: &generator))
    }

    /// Versions that receive traffic.
    public var activeVersions: [Int] { weights.filter { $0.weight > 0 }.map(\.version) }
}
