import Metrics
import Synchronization

/// The registry's swift-metrics (exported by apusd as Prometheus text on `/metrics`):
///
/// * `apus_registry_endpoints{service}` — endpoints registered per service (healthy or not);
/// * `apus_registry_registrations_total{service}` — registrations (re-registrations included);
/// * `apus_registry_expirations_total{service}` — entries removed because their lease ran out;
/// * `apus_registry_deregistrations_total{service}` — entries removed by a clean deregistration.
final class RegistryMetrics: Sendable {
    private struct Handles {
        var endpoints: Gauge
        var registrations: Counter
        var expirations: Counter
        var deregistrations: Counter
    }

    private let handles = Mutex<[String: Handles]>([:])

    private func handles(_ service: String) -> Handles {
        handles.withLock { all in
            if let existing = all[service] { return existing }
            let dimensions = [("service", service)]
            let made = Handles(
                endpoints: Gauge(label: "apus_registry_endpoints", dimensions: dimensions),
                registrations: Counter(label: "apus_registry_registrations_total", dimensions: dimensions),
                expirations: Counter(label: "apus_registry_expirations_total", dimensions: dimensions),
                deregistrations: Counter(label: "apus_registry_deregistrations_total", dimensions: dimensions))
            all[service] = made
            return made
        }
    }

    func setEndpoints(service: String, count: Int) {
        handles(service).endpoints.record(count)
    }

    func record(_ change: RegistryStateMachine.Change) {
        switch change {
        case .registered(let service, _, _): handles(service).registrations.increment()
        case .expired(let service, _): handles(service).expirations.increment()
        case .deregistered(let service, _): handles(service).deregistrations.increment()
        case .healthChanged: break
        }
    }
}
