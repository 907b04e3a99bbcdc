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
        var n = counter.wrappingAdd(1, ordering: .relaxed).newValue
        // The prefix, then the counter in base 36 (at most 13 digits), written in place: this runs for every
        // request, and concatenating a formatted number costs several times as much.
        var prefix = prefix
        return prefix.withUTF8 { prefixBytes in
            String(unsafeUninitializedCapacity: prefixBytes.count + 13) { buffer in
                _ = buffer.initialize(fromContentsOf: prefixBytes)
                var digits = 0
                repeat {
                    buffer[prefixBytes.count + digits] = Self.base36[Int(n % 36)]
                    n /= 36
                    digits += 1
                } while n > 0
                buffer[prefixBytes.count..<(prefixBytes.count + digits)].reverse()
                return prefixBytes.count + digits
            }
        }
    }

    private static let base36: [UInt8] = Array("0123456789abcdefghijklmnopqrstuvwxyz".utf8)
}
