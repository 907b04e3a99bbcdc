/// The task manager's metric families (emitted through swift-metrics) and their help texts, for the Prometheus
/// export.
public enum TaskMetrics {
    public static let help: [String: String] = [
        "apus_tasks_submitted_total": "Asynchronous tasks accepted (durably stored), by function.",
        "apus_tasks_completed_total": "Asynchronous tasks that ended, by function and outcome (succeeded, failed, cancelled, timed_out, expired).",
        "apus_tasks_queued": "Asynchronous tasks waiting to run (including retries in backoff), by function.",
        "apus_tasks_running": "Asynchronous tasks running now, by function.",
        "apus_tasks_oldest_queued_age_seconds": "Age of the oldest queued asynchronous task, by function (0 when none waits).",
    ]
}
