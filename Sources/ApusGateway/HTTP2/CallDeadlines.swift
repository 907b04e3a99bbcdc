import NIOCore

/// A call with a deadline kept by `CallDeadlines`.
protocol DeadlineTarget: AnyObject {
    var deadline: ContinuousClock.Instant { get }
    /// Where `CallDeadlines` keeps the call (-1: not kept).
    var deadlineSlot: Int { get set }
    func deadlinePassed()
}

/// The deadlines of the calls on one event loop under one NIO timer, instead of a scheduled task per call (a
/// promise, a closure and two heap operations each, which showed in the profile). The timer is set for the
/// earliest deadline known when it was set; a call that finishes just leaves the list (a swap with the last),
/// and when the timer fires it looks at every call still kept, ends those whose deadline has passed and is set
/// again for the earliest remaining one. Calls that usually finish well before their deadline therefore cost one
/// timer per deadline period, not one per call. One per event loop (`GatewayShared.callDeadlines(for:)`), shared by
/// the gRPC calls, the HTTP/2 relays and the Thrift calls of that loop; used on its loop only.
final class CallDeadlines: @unchecked Sendable {
    private let eventLoop: any EventLoop
    private var calls: [any DeadlineTarget] = []
    private var timer: Scheduled<Void>?
    private var timerDeadline: ContinuousClock.Instant?

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    var count: Int { calls.count }

    func add(_ call: any DeadlineTarget) {
        guard call.deadlineSlot < 0 else { return }
        call.deadlineSlot = calls.count
        calls.append(call)
        if timerDeadline.map({ call.deadline < $0 }) ?? true { arm(call.deadline) }
    }

    func remove(_ call: any DeadlineTarget) {
        let slot = call.deadlineSlot
        guard slot >= 0, slot < calls.count, calls[slot] === call else { return }
        call.deadlineSlot = -1
        let last = calls.removeLast()
        if slot < calls.count {
            calls[slot] = last
            last.deadlineSlot = slot
        }
        // The timer stays set: it fires once, finds nothing due and is set again only if calls remain.
    }

    private func arm(_ deadline: ContinuousClock.Instant) {
        timer?.cancel()
        timerDeadline = deadline
        let delay = ContinuousClock.now.duration(to: deadline)
        let nanoseconds = max(0, delay.nanoseconds)
        timer = eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(nanoseconds)) { [self] in fire() }
    }

    private func fire() {
        timer = nil
        timerDeadline = nil
        let now = ContinuousClock.now
        var due: [any DeadlineTarget] = []
        var earliest: ContinuousClock.Instant?
        for call in calls {
            if call.deadline <= now {
                due.append(call)
            } else if earliest.map({ call.deadline < $0 }) ?? true {
                earliest = call.deadline
            }
        }
        for call in due { remove(call) }
        if let earliest { arm(earliest) }
        for call in due { call.deadlinePassed() }
    }
}
