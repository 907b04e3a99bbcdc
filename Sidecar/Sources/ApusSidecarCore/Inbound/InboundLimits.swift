import Synchronization

/// The inbound side's admission: a concurrency limit on requests to the app and a token bucket per caller.
final class InboundLimits: Sendable {
    private struct State {
        var config: SidecarConfig.InboundConfig
        var inFlight = 0
        var buckets: [String: TokenBucket] = [:]
        var lastSweep: Nanos = 0
    }

    enum Decision: Equatable {
        case admitted
        case overConcurrency(Int)
        case rateLimited(caller: String, retryAfterSeconds: Int)
    }

    private let state: Mutex<State>
    static let maxCallers = 10_000

    init(config: SidecarConfig.InboundConfig) {
        state = Mutex(State(config: config))
    }

    func update(_ config: SidecarConfig.InboundConfig) {
        state.withLock { state in
            if state.config.rateLimit != config.rateLimit { state.buckets = [:] }
            state.config = config
        }
    }

    /// Admits one request from `caller`; an admitted request must be followed by `release()`.
    func admit(caller: String, now: Nanos) -> Decision {
        state.withLock { state in
            let limit = state.config.maxConcurrency
            if limit > 0, state.inFlight >= limit { return .overConcurrency(limit) }
            if let rate = state.config.rateLimit {
                if now > state.lastSweep + 10_000_000_000 || state.buckets.count > Self.maxCallers {
                    state.buckets = state.buckets.filter { !$0.value.isIdle(now: now) }
                    state.lastSweep = now
                }
                var bucket = state.buckets[caller] ?? TokenBucket(rate: rate.requestsPerSecond, burst: rate.burst, now: now)
                let taken = bucket.tryTake(now: now)
                state.buckets[caller] = bucket
                if !taken { return .rateLimited(caller: caller, retryAfterSeconds: max(1, Int(bucket.secondsUntilToken().rounded(.up)))) }
            }
            state.inFlight += 1
            return .admitted
        }
    }

    func release() {
        state.withLock { $0.inFlight -= 1 }
    }

    var inFlight: Int { state.withLock { $0.inFlight } }
}
