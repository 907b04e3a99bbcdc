import ApusCore
import Foundation
import Testing

@Suite("release weights")
struct ReleaseTests {
    let split = Release(function: "f", weights: [.init(version: 1, weight: 90), .init(version: 2, weight: 10)], updatedAt: Date())

    @Test func rollsMapOntoWeights() {
        #expect(split.pickVersion(roll: 0) == 1)
        #expect(split.pickVersion(roll: 89) == 1)
        #expect(split.pickVersion(roll: 90) == 2)
        #expect(split.pickVersion(roll: 99) == 2)
    }

    @Test func everyRollCountsOnce() {
        var counts: [Int: Int] = [:]
        for roll in 0..<100 { counts[split.pickVersion(roll: roll)!, default: 0] += 1 }
        #expect(counts == [1: 90, 2: 10])
    }

    @Test func zeroWeightVersionsNeverChosen() {
        let r = Release(function: "f", weights: [.init(version: 1, weight: 0), .init(version: 2, weight: 100)], updatedAt: Date())
        for roll in 0..<100 { #expect(r.pickVersion(roll: roll) == 2) }
        #expect(r.activeVersions == [2])
    }

    @Test func seededGeneratorGivesStableShare() {
        struct SplitMix: RandomNumberGenerator {
            var state: UInt64
            mutating func next() -> UInt64 {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                return z ^ (z >> 31)
            }
        }
        var generator = SplitMix(state: 42)
        var second = 0
        for _ in 0..<10_000 where split.pickVersion(using: &generator) == 2 { second += 1 }
        #expect((800...1200).contains(second))
    }

    @Test func validation() throws {
        try Release.validate(weights: split.weights, existingVersions: [1, 2])
        #expect(throws: ApusError.self) { try Release.validate(weights: [.init(version: 1, weight: 50)], existingVersions: [1]) }
        #expect(throws: ApusError.self) { try Release.validate(weights: [.init(version: 3, weight: 100)], existingVersions: [1]) }
        #expect(throws: ApusError.self) { try Release.validate(weights: [], existingVersions: [1]) }
        #expect(throws: ApusError.self) {
            try Release.validate(weights: [.init(version: 1, weight: 50), .init(version: 1, weight: 50)], existingVersions: [1])
        }
        #expect(throws: ApusError.self) {
            try Release.validate(weights: [.init(version: 1, weight: 150), .init(version: 2, weight: -50)], existingVersions: [1, 2])
        }
    }

    @Test func errorEnvelopeEscapes() {
        let e = ApusError(.notFound, "no \"x\"\nthere")
        #expect(e.jsonBody == #"{"error":{"code":"not_found","message":"no \"x\"\nthere"}}"#)
    }
}
