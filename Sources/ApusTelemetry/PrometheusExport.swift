import CoreMetrics
import Prometheus

/// Exports the process's swift-metrics as Prometheus text, with a `# HELP` line for every family.
///
/// swift-prometheus' own factory registers every metric made through swift-metrics with an empty help text; this
/// factory asks `help(name)` instead, so each family is described once, the same way for all of its series (the
/// registry refuses two series of one family with different help texts).
public struct PrometheusExport: Sendable {
    public let registry: PrometheusCollectorRegistry
    let factory: HelpingMetricsFactory

    /// `help` describes families by name; names it does not know fall back to `MetricHelp.describe`.
    public init(help: [String: String] = [:], durationBuckets: [Duration] = PrometheusExport.defaultDurationBuckets) {
        let registry = PrometheusCollectorRegistry()
        var base = PrometheusMetricsFactory(registry: registry)
        base.defaultDurationHistogramBuckets = durationBuckets
        let texts = MetricHelp.texts.merging(help) { _, given in given }
        self.registry = registry
        self.factory = HelpingMetricsFactory(base: base, registry: registry, buckets: durationBuckets) { name in
            texts[name] ?? MetricHelp.describe(name)
        }
    }

    /// Makes this export the process's swift-metrics backend (once per process).
    public func bootstrap() {
        MetricsSystem.bootstrap(factory)
    }

    /// The exposition text (format 0.0.4).
    public func render() -> [UInt8] {
        registry.emitToBuffer()
    }

    /// From 250 µs (a proxied request) to a minute (a cold start or a long call).
    public static let defaultDurationBuckets: [Duration] = [
        .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
        .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
        .seconds(2), .seconds(5), .seconds(10), .seconds(30), .seconds(60),
    ]
}

/// One help text per metric family of the platform.
public enum MetricHelp {
    public static let texts: [String: String] = [
        "apus_requests_total": "Requests finished by the gateway, by function, version, edge protocol and outcome code.",
        "apus_request_duration_seconds": "Gateway time per request, from arrival to the last byte of the response.",
        "apus_requests_rejected_total": "Requests a version's pool refused without a slot, by reason (overloaded is load shedding).",
        "apus_queue_depth": "Requests waiting for an instance slot.",
        "apus_requests_in_flight": "Requests holding an instance slot.",
        "apus_instances": "Instances of a version by state (starting, ready, draining).",
        "apus_scaler_desired_instances": "Instances the autoscaler last asked the version to keep.",
        "apus_scaler_panicking": "1 while the autoscaler is in panic mode for the version.",
        "apus_scaler_decisions_total": "Autoscaler decisions by direction (up, down, hold), one per version per tick.",
        "apus_cold_starts_total": "Instances that became ready, by function, runtime and whether a prewarmed process was used.",
        "apus_cold_start_duration_seconds": "Time from launching an instance to its readiness probe passing.",
        "apus_instance_start_failures_total": "Instances that never became ready.",
        "apus_registry_endpoints": "Endpoints registered per mesh service in the embedded registry (healthy or not).",
        "apus_registry_registrations_total": "Registrations per mesh service in the embedded registry (re-registrations included).",
        "apus_registry_expirations_total": "Registry entries removed because their lease ran out without a heartbeat.",
        "apus_registry_deregistrations_total": "Registry entries removed by a clean deregistration.",
    ]

    /// A generic description for a family no table names.
    public static func describe(_ name: String) -> String {
        "Apus metric \(name)."
    }
}

/// swift-metrics handlers from a Prometheus registry, each family registered with its help text.
struct HelpingMetricsFactory: MetricsFactory {
    let base: PrometheusMetricsFactory
    let registry: PrometheusCollectorRegistry
    let buckets: [Duration]
    let help: @Sendable (String) -> String

    private func descriptor(_ name: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help(name))
    }

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
    }

    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        guard aggregate else { return registry.makeGauge(descriptor: descriptor(label), labels: dimensions) }
        return base.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate)
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        registry.makeDurationHistogram(descriptor: descriptor(label), labels: dimensions, buckets: buckets)
    }

    func destroyCounter(_ handler: any CounterHandler) { base.destroyCounter(handler) }
    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) { base.destroyFloatingPointCounter(handler) }
    func destroyRecorder(_ handler: any RecorderHandler) { base.destroyRecorder(handler) }
    func destroyMeter(_ handler: any MeterHandler) { base.destroyMeter(handler) }
    func destroyTimer(_ handler: any TimerHandler) { base.destroyTimer(handler) }
}
