/// Numbers in 0..<100 for choosing a version by release weight: xorshift64, seeded once, so a request costs a few
/// shifts instead of a `getrandom` system call. Not thread-safe: one per connection or event loop.
/// One per event loop (`GatewayShared.roll(on:)`) and one per reactor loop: every edge rolls its traffic split the
/// same way.
struct SplitRoll {
    private var state = UInt64.random(in: 1...UInt64.max)

    mutating func next() -> Int {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return Int(state % 100)
    }
}

/// An event loop's `SplitRoll`, used on that loop only.
final class LoopSplitRoll: @unchecked Sendable {
    private var roll = SplitRoll()

    func next() -> Int {
        roll.next()
    }
}
