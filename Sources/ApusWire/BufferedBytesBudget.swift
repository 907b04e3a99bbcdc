import Synchronization

/// Bytes the gateway holds across all its connections against one cap: one budget for Thrift messages that are not
/// whole yet (frames and unframed messages still arriving), one for HTTP request bodies held in memory (HTTP/2 and
/// gRPC streams waiting for an instance, asynchronous bodies being collected, HTTP/1.1 read-ahead). Each connection
/// alone is bounded by its own limits (frame size, flow-control window, read-ahead, head timeout); this bounds them
/// together, so many slow senders cannot add up to apusd's memory. Past the cap, the request or connection whose
/// bytes would go over is refused; the others are untouched.
package final class BufferedBytesBudget: Sendable {
    package let limit: Int
    private let held = Atomic<Int>(0)

    /// HTTP/1.1 bytes a connection may read ahead without counting (a request head and a small body): the common
    /// request never touches the shared counter.
    @inlinable
    package static var freePerConnection: Int { 64 << 10 }

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
