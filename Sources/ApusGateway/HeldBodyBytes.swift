/// What one connection or stream holds of the gateway's HTTP body budget (`GatewayShared.httpBodies`): every holder
/// changes its count here, so the count and the shared total never disagree.
struct HeldBodyBytes {
    private(set) var count = 0

    /// Holds `new` bytes instead of `count`; false, and nothing changes, when the budget has no room for the growth.
    mutating func set(_ new: Int, in shared: GatewayShared) -> Bool {
        guard new != count else { return true }
        guard shared.holdBodyBytes(from: count, to: new) else { return false }
        count = new
        return true
    }

    /// Holds `more` bytes on top of `count`.
    mutating func add(_ more: Int, in shared: GatewayShared) -> Bool {
        set(count + more, in: shared)
    }

    /// Gives every byte back.
    mutating func release(in shared: GatewayShared) {
        _ = set(0, in: shared)
    }
}
