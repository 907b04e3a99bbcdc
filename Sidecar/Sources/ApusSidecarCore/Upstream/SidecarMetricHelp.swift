/// Help texts of the sidecar's metric families (outbound per upstream, inbound as the upstream "app").
public enum SidecarMetricHelp {
    public static let texts: [String: String] = {
        var texts: [String: String] = [:]
        for (prefix, side) in [("apus_sidecar_upstream", "an outbound upstream"), ("apus_sidecar_inbound", "the fronted app")] {
            texts["\(prefix)_requests_total"] = "Requests to \(side), by final status code."
            texts["\(prefix)_request_duration_seconds"] = "Time per request to \(side), retries included."
            texts["\(prefix)_retries_total"] = "Retries sent to \(side)."
            texts["\(prefix)_breaker_open"] = "1 while the circuit breaker of \(side) is open."
            texts["\(prefix)_ejections_total"] = "Endpoints of \(side) ejected as outliers."
        }
        return texts
    }()
}
