/// Numbers in 0..<100 for choosing a version by release weight: xorshift64, seeded once, so a request costs a few
/// shifts instead of a `getrandom` system call. Not thread-safe: one per connection or event loop.
struct SplitRoll {
    private var state = UInt64.random(in: 1...UInt64.max)

    mutating func next() -> Int {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return Int(state % 100)
    }
}
