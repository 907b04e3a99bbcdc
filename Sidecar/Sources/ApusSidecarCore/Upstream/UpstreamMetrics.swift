import Metrics
import Synchronization

/// The swift-metrics instruments of one upstream (served as Prometheus text on the admin port).
/// Counters per status code are made once and kept.
final class UpstreamMetrics: Sendable {
    let upstream: String
    private let requests = Mutex<[Int: Counter]>([:])
    let duration: Metrics.Timer
    let retries: Counter
    let breakerOpen: Gauge
    let ejections: Counter

    init(upstream: String, prefix: String) {
        self.upstream = upstream
        let dims = [("upstream", upstream)]
        duration = Metrics.Timer(label: "\(prefix)_request_duration_seconds", dimensions: dims, preferredDisplayUnit: .seconds)
        retries = Counter(label: "\(prefix)_retries_total", dimensions: dims)
        breakerOpen = Gauge(label: "\(prefix)_breaker_open", dimensions: dims)
        ejections = Counter(label: "\(prefix)_ejections_total", dimensions: dims)
        self.prefix = prefix
        breakerOpen.record(0)
    }

    private let prefix: String

    func recordRequest(code: Int, nanoseconds: UInt64) {
        let counter = requests.withLock { counters in
            if let existing = counters[code] { return existing }
            let made = Counter(label: "\(prefix)_requests_total", dimensions: [("upstream", upstream), ("code", String(code))])
            counters[code] = made
            return made
        }
        counter.increment()
        duration.recordNanoseconds(Int64(clamping: nanoseconds))
    }
}
