import Synchronization

/// Unique request ids without a random draw per request: a random per-process prefix and a counter,
/// e.g. `r-k3f9x2-1a7`. Unique within a process lifetime and, by the prefix, across restarts.
public final class RequestIDGenerator: Sendable {
    private let prefix: String
    private let counter = Atomic<UInt64>(0)

    public init() {
        prefix = Identifier.make(prefix: "r-", length: 6) + "-"
    }

    public func next() -> String {
        let n = counter.wrappingAdd(1, ordering: .relaxed).newValue
        return prefix + String(n, radix: 36)
    }
}
