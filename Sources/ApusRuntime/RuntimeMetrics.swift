import ApusCore
import Metrics

/// The runtime's metrics (swift-metrics; exported by whichever backend the daemon bootstraps).
enum RuntimeMetrics {
    /// An instance became ready: counted in `apus_cold_starts_total` and timed in
    /// `apus_cold_start_duration_seconds`, labelled by function, runtime and whether a prewarmed process was used.
    static func coldStart(function: String, runtime: String, prewarmed: Bool, duration: Duration) {
        let dimensions = [("function", function), ("runtime", runtime), ("prewarmed", prewarmed ? "true" : "false")]
        Counter(label: "apus_cold_starts_total", dimensions: dimensions).increment()
        Timer(label: "apus_cold_start_duration_seconds", dimensions: dimensions).recordNanoseconds(duration.nanoseconds)
    }

    /// An instance never became ready.
    static func startFailed(function: String, runtime: String) {
        Counter(label: "apus_instance_start_failures_total", dimensions: [("function", function), ("runtime", runtime)]).increment()
    }

    /// The kernel's OOM killer ended an instance at its memory limit: `apus_instance_oom_kills_total`.
    static func outOfMemory(function: String) {
        Counter(label: "apus_instance_oom_kills_total", dimensions: [("function", function)]).increment()
    }
}
