import NIOCore

/// Monotonic time in nanoseconds. The policy state machines take `now` as an argument so tests drive them with
/// made-up times; the proxy passes `SidecarClock.now()`.
public typealias Nanos = UInt64

public enum SidecarClock {
    @inline(__always)
    public static func now() -> Nanos { NIODeadline.now().uptimeNanoseconds }

    public static func nanos(_ duration: Duration) -> Nanos {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0 else { return 0 }
        return Nanos(seconds) * 1_000_000_000 + Nanos(attoseconds / 1_000_000_000)
    }
}

/// A small fast generator (xorshift64*) so balancing choices can be seeded in tests.
public struct XorShiftRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) {
        state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed
    }

    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}
