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
