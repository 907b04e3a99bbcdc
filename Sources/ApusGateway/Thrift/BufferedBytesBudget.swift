import Synchronization

/// Bytes the gateway holds across all its connections in Thrift messages that are not whole yet (frames and
/// unframed messages still arriving), against one cap. Each connection alone is bounded by the frame size limit
/// and the head timeout; this bounds them together, so many slow senders cannot add up to apusd's memory.
/// Past the cap, the connection whose bytes would go over is closed; the others are untouched.
package final class BufferedBytesBudget: Sendable {
    package let limit: Int
    private let held = Atomic<Int>(0)

    package init(limit: Int) {
        self.limit = limit
    }

    /// Bytes held now over all connections.
    package var current: Int { held.load(ordering: .relaxed) }

    /// One connection's holding changes from `old` to `new` bytes. False (and nothing changes) when the growth
    /// would take the total past the limit.
    package func update(from old: Int, to new: Int) -> Bool {
        let delta = new - old
        guard delta > 0 else {
            if delta < 0 { held.subtract(-delta, ordering: .relaxed) }
            return true
        }
        let after = held.add(delta, ordering: .relaxed).newValue
        guard after <= limit else {
            held.subtract(delta, ordering: .relaxed)
            return false
        }
        return true
    }
}
