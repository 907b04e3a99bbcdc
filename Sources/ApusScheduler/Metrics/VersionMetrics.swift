import Metrics
import Synchronization

/// The metrics of one function version, labelled `function` and `version` (swift-metrics; the daemon exports them
/// as Prometheus text on the API port's `/metrics`):
///
/// * `apus_requests_total{protocol, code}` — finished requests by edge protocol and outcome (`http`: the status;
///   `grpc`: the numeric grpc-status; `thrift`: `reply`, `exception` or an error name);
/// * `apus_request_duration_seconds` — gateway time per request, arrival to last byte (histogram);
/// * `apus_requests_rejected_total{reason}` — requests the pool refused without a slot (`overloaded` is shedding);
/// * gauges `apus_queue_depth`, `apus_requests_in_flight`, `apus_instances{state}`, refreshed on each scheduler
///   tick and at scrape time;
/// * `apus_scaler_desired_instances`, `apus_scaler_panicking`, `apus_scaler_decisions_total{direction}`.
///
/// Handles are made once per version (codes on first use), so recording is a dictionary lookup and an atomic add.
public final class VersionMetrics: Sendable {
    private struct OutcomeKey: Hashable {
        var protocolName: String
        var code: String
    }

    let dimensions: [(String, String)]
    private let outcomes = Mutex<[OutcomeKey: Counter]>([:])
    private let rejections = Mutex<[String: Counter]>([:])
    private let latency: Timer
    private let queueDepth: Gauge
    private let inFlight: Gauge
    private let instances: [InstancePoolStateMachine.InstanceState: Gauge]
    private let desired: Gauge
    private let panicking: Gauge
    private let decisions: [String: Counter]

    init(function: String, version: Int) {
        let dimensions = [("function", function), ("version", String(version))]
        self.dimensions = dimensions
        latency = Timer(label: "apus_request_duration_seconds", dimensions: dimensions)
        queueDepth = Gauge(label: "apus_queue_depth", dimensions: dimensions)
        inFlight = Gauge(label: "apus_requests_in_flight", dimensions: dimensions)
        var instances: [InstancePoolStateMachine.InstanceState: Gauge] = [:]
        for state in [InstancePoolStateMachine.InstanceState.starting, .ready, .draining] {
            instances[state] = Gauge(label: "apus_instances", dimensions: dimensions + [("state", state.rawValue)])
        }
        self.instances = instances
        desired = Gauge(label: "apus_scaler_desired_instances", dimensions: dimensions)
        panicking = Gauge(label: "apus_scaler_panicking", dimensions: dimensions)
        var decisions: [String: Counter] = [:]
        for direction in ["up", "down", "hold"] {
            decisions[direction] = Counter(label: "apus_scaler_decisions_total", dimensions: dimensions + [("direction", direction)])
        }
        self.decisions = decisions
    }

    /// One finished request: its outcome on the edge's protocol and the time since it arrived.
    public func recordRequest(protocol protocolName: String, code: String, since start: ContinuousClock.Instant) {
        outcome(protocolName, code).increment()
        latency.record(duration: ContinuousClock.now - start)
    }

    /// `recordRequest` with the time taken in nanoseconds.
    public func recordRequest(protocol protocolName: String, code: String, elapsedNanoseconds: Int64) {
        outcome(protocolName, code).increment()
        latency.recordNanoseconds(elapsedNanoseconds)
    }

    private func outcome(_ protocolName: String, _ code: String) -> Counter {
        let key = OutcomeKey(protocolName: protocolName, code: code)
        return outcomes.withLock { counters in
            if let counter = counters[key] { return counter }
            let counter = Counter(label: "apus_requests_total", dimensions: dimensions + [("protocol", protocolName), ("code", code)])
            counters[key] = counter
            return counter
        }
    }

    /// `recordRequest` for the HTTP edges by status code: one array slot per status instead of a dictionary
    /// lookup keyed by two strings (this runs for every request).
    private let httpOutcomes = Mutex<[Counter?]>(Array(repeating: nil, count: 600))

    public func recordHTTPRequest(status: Int, since start: ContinuousClock.Instant) {
        guard (0..<600).contains(status) else {
            recordRequest(protocol: "http", code: String(status), since: start)
            return
        }
        httpOutcome(status).increment()
        latency.record(duration: ContinuousClock.now - start)
    }

    /// `recordHTTPRequest` with the time taken already in nanoseconds (from a monotonic clock the caller reads
    /// anyway), which spares the 128-bit arithmetic of `Duration`.
    public func recordHTTPRequest(status: Int, elapsedNanoseconds: Int64) {
        guard (0..<600).contains(status) else {
            recordRequest(protocol: "http", code: String(status), elapsedNanoseconds: elapsedNanoseconds)
            return
        }
        httpOutcome(status).increment()
        latency.recordNanoseconds(elapsedNanoseconds)
    }

    private func httpOutcome(_ status: Int) -> Counter {
        httpOutcomes.withLock { counters in
            if let counter = counters[status] { return counter }
            let counter = outcome("http", String(status))
            counters[status] = counter
            return counter
        }
    }

    /// A request refused by the pool before it got a slot.
    func recordRejection(_ reason: String) {
        let counter = rejections.withLock { counters in
            if let counter = counters[reason] { return counter }
            let counter = Counter(label: "apus_requests_rejected_total", dimensions: dimensions + [("reason", reason)])
            counters[reason] = counter
            return counter
        }
        counter.increment()
    }

    func recordLoad(queued: Int, inFlight: Int, instancesByState: [InstancePoolStateMachine.InstanceState: Int]) {
        queueDepth.record(queued)
        self.inFlight.record(inFlight)
        for (state, gauge) in instances {
            gauge.record(instancesByState[state] ?? 0)
        }
    }

    func recordDecision(desired: Int, previous: Int?, panicking: Bool) {
        self.desired.record(desired)
        self.panicking.record(panicking ? 1 : 0)
        let direction = desired > (previous ?? 0) ? "up" : desired < (previous ?? 0) ? "down" : "hold"
        decisions[direction]?.increment()
    }

    /// Unregisters every series of this version (its pool is gone).
    func destroy() {
        for counter in outcomes.withLock({ Array($0.values) }) { counter.destroy() }
        for counter in rejections.withLock({ Array($0.values) }) { counter.destroy() }
        latency.destroy()
        queueDepth.destroy()
        inFlight.destroy()
        for gauge in instances.values { gauge.destroy() }
        desired.destroy()
        panicking.destroy()
        for counter in decisions.values { counter.destroy() }
    }
}
