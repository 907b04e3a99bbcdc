/// The per-upstream breaker: opens after `consecutiveFailures` failures in a row, refuses every request while
/// open, lets one probe through once `coolDown` has passed (half-open), closes when the probe succeeds and opens
/// again for another cool-down when it fails.
public struct CircuitBreaker: Sendable {
    public struct Settings: Sendable, Equatable {
        public var consecutiveFailures: Int
        public var coolDown: Nanos

        public init(consecutiveFailures: Int = 5, coolDown: Nanos = 5_000_000_000) {
            self.consecutiveFailures = consecutiveFailures
            self.coolDown = coolDown
        }

        public static var defaults: Settings { Settings() }
    }

    public enum State: Sendable, Equatable {
        case closed(failures: Int)
        case open(until: Nanos)
        case halfOpen(probeInFlight: Bool)

        public var name: String {
            switch self {
            case .closed: "closed"
            case .open: "open"
            case .halfOpen: "half_open"
            }
        }
    }

    public var settings: Settings
    public private(set) var state = State.closed(failures: 0)

    public init(settings: Settings = .defaults) {
        self.settings = settings
    }

    /// Whether a request may go now (a half-open breaker admits one probe at a time).
    public mutating func allow(now: Nanos) -> Bool {
        switch state {
        case .closed:
            return true
        case .open(let until):
            guard now >= until else { return false }
            state = .halfOpen(probeInFlight: true)
            return true
        case .halfOpen(let probeInFlight):
            if probeInFlight { return false }
            state = .halfOpen(probeInFlight: true)
            return true
        }
    }

    public mutating func recordSuccess() {
        state = .closed(failures: 0)
    }

    /// Returns true when this failure opened the breaker.
    @discardableResult
    public mutating func recordFailure(now: Nanos) -> Bool {
        switch state {
        case .closed(let failures):
            if failures + 1 >= settings.consecutiveFailures {
                state = .open(until: now + settings.coolDown)
                return true
            }
            state = .closed(failures: failures + 1)
            return false
        case .halfOpen:
            state = .open(until: now + settings.coolDown)
            return true
        case .open:
            return false
        }
    }

    /// A request admitted as the half-open probe ended without a verdict (client left): let another probe go.
    public mutating func probeAbandoned() {
        if case .halfOpen = state { state = .halfOpen(probeInFlight: false) }
    }

    /// Open, or half-open with its probe out: new requests are refused.
    public func isRefusing(now: Nanos) -> Bool {
        switch state {
        case .closed: false
        case .open(let until): now < until
        case .halfOpen(let probe): probe
        }
    }
}
