/// A token bucket: `rate` tokens a second up to `burst`; each request takes one.
public struct TokenBucket: Sendable {
    public var rate: Double
    public var burst: Double
    private var tokens: Double
    private var last: Nanos

    public init(rate: Double, burst: Double, now: Nanos) {
        self.rate = rate
        self.burst = max(burst, 1)
        self.tokens = max(burst, 1)
        self.last = now
    }

    public mutating func tryTake(now: Nanos) -> Bool {
        if now > last {
            tokens = min(burst, tokens + Double(now - last) / 1e9 * rate)
            last = now
        }
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }

    /// Seconds until one token is available (for Retry-After).
    public func secondsUntilToken() -> Double {
        tokens >= 1 || rate <= 0 ? 0 : (1 - tokens) / rate
    }

    /// A full bucket that has not been touched for a while can be forgotten.
    public func isIdle(now: Nanos) -> Bool {
        now > last && tokens + Double(now - last) / 1e9 * rate >= burst
    }
}
