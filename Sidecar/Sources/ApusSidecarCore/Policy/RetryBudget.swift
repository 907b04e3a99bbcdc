/// Caps retries to a share of the requests over a sliding window (Linkerd's and Finagle's retry budget): a retry
/// is allowed while retries in the window stay below `max(minRetries, ratio × requests)`. The window is kept as
/// one-second buckets.
public struct RetryBudget: Sendable {
    public struct Settings: Sendable, Equatable {
        public var ratio: Double
        /// Retries always allowed per window, so a quiet upstream can still retry.
        public var minRetries: Int
        public var windowSeconds: Int

        public init(ratio: Double = 0.2, minRetries: Int = 10, windowSeconds: Int = 10) {
            self.ratio = ratio
            self.minRetries = minRetries
            self.windowSeconds = windowSeconds
        }

        public static var defaults: Settings { Settings() }
    }

    public var settings: Settings
    private var buckets: [(second: UInt64, requests: Int, retries: Int)]

    public init(settings: Settings = .defaults) {
        self.settings = settings
        self.buckets = Array(repeating: (UInt64.max, 0, 0), count: max(settings.windowSeconds, 1))
    }

    private mutating func bucket(_ now: Nanos) -> Int {
        let second = now / 1_000_000_000
        let index = Int(second % UInt64(buckets.count))
        if buckets[index].second != second { buckets[index] = (second, 0, 0) }
        return index
    }

    private func totals(_ now: Nanos) -> (requests: Int, retries: Int) {
        let second = now / 1_000_000_000
        var requests = 0, retries = 0
        for entry in buckets where entry.second != .max && entry.second + UInt64(buckets.count) > second && entry.second <= second {
            requests += entry.requests
            retries += entry.retries
        }
        return (requests, retries)
    }

    /// Counts an original request (not a retry).
    public mutating func recordRequest(now: Nanos) {
        buckets[bucket(now)].requests += 1
    }

    /// Takes one retry from the budget; false when the budget is spent.
    public mutating func tryRetry(now: Nanos) -> Bool {
        let index = bucket(now)
        let (requests, retries) = totals(now)
        let allowed = max(settings.minRetries, Int(settings.ratio * Double(requests)))
        guard retries < allowed else { return false }
        buckets[index].retries += 1
        return true
    }

    public func retriesInWindow(now: Nanos) -> Int { totals(now).retries }
    public func requestsInWindow(now: Nanos) -> Int { totals(now).requests }
}
