import ApusCore
import ApusScheduler
import NIOCore

/// Something on an event loop that waits for a slot decision (an HTTP/1 connection, an HTTP/2 stream).
protocol LoopSlotTarget: AnyObject {
    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>)
}

/// Carries a slot decision from whatever thread made it to the waiter's event loop.
final class LoopSlotWaiter: SlotWaiter {
    let target: NIOLoopBound<any LoopSlotTarget>

    init(_ target: NIOLoopBound<any LoopSlotTarget>) {
        self.target = target
    }

    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
        let target = self.target
        target.eventLoop.execute { target.value.slotDecided(requestID: requestID, result) }
    }
}

extension Channel {
    /// Turns reading on or off. HTTP/2 stream channels do not start reading when autoRead is switched back on,
    /// so a read is asked for explicitly.
    func setReading(_ enabled: Bool) {
        setOption(ChannelOptions.autoRead, value: enabled).whenFailure { _ in }
        if enabled { read() }
    }
}

/// The instance slot one call holds or waits for: asks the version's pool, keeps the lease or the place in the
/// queue, and gives either back. Used by the HTTP/2 stream handlers (gRPC and HTTP-over-HTTP/2).
struct CallSlot {
    enum Outcome {
        case leased(InstancePool.Lease)
        case failed(ApusError)
        /// Queued: the waiter hears the decision later (`decided`).
        case waiting
    }

    var pool: InstancePool?
    private(set) var lease: InstancePool.Lease?
    private(set) var queued = false

    mutating func acquire(requestID: String, deadline: ContinuousClock.Instant, waiter: any SlotWaiter, shard: UInt64) -> Outcome {
        guard let pool else { return .failed(ApusError(.internal, "no pool for the call")) }
        switch pool.acquire(requestID: requestID, deadline: deadline, waiter: waiter, shard: shard) {
        case .leased(let lease):
            self.lease = lease
            return .leased(lease)
        case .failed(let error):
            return .failed(error)
        case .queued:
            queued = true
            return .waiting
        }
    }

    /// A queued decision arrived. When the call no longer waits for it, a lease it carries goes straight back and
    /// the result is nil.
    mutating func decided(_ result: Result<InstancePool.Lease, ApusError>, stillWaiting: Bool) -> Outcome? {
        guard stillWaiting else {
            if case .success(let lease) = result { pool?.release(lease) }
            return nil
        }
        queued = false
        switch result {
        case .success(let lease):
            self.lease = lease
            return .leased(lease)
        case .failure(let error):
            return .failed(error)
        }
    }

    /// Nobody listens on the lease's instance: it leaves service, and the lease needs no release.
    mutating func reportUnreachable() {
        if let lease { pool?.reportUnreachable(lease) }
        lease = nil
    }

    /// Gives back the lease, or the place in the queue (a decision already on its way is handed back by `decided`).
    mutating func giveBack(requestID: String) {
        if let lease {
            pool?.release(lease)
        } else if queued {
            _ = pool?.cancel(requestID: requestID)
        }
        lease = nil
        queued = false
    }
}
