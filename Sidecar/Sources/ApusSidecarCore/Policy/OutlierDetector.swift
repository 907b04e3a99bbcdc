/// Passive outlier ejection by consecutive failures (Envoy's `consecutive_5xx`): an endpoint that fails
/// `consecutiveFailures` times in a row leaves the rotation for `baseEjection × ejections so far` (capped at
/// `maxEjection`), unless that would eject more than `maxEjectionPercent` of the upstream (one endpoint may always
/// be ejected when there are at least two). It returns when its time is up; a success resets its failure count
/// and, once it has served well for a while, its ejection count decays.
public struct OutlierDetector: Sendable {
    public struct Settings: Sendable, Equatable {
        public var consecutiveFailures: Int
        public var baseEjection: Nanos
        public var maxEjection: Nanos
        public var maxEjectionPercent: Int

        public init(consecutiveFailures: Int = 5, baseEjection: Nanos = 30_000_000_000, maxEjection: Nanos = 300_000_000_000,
                    maxEjectionPercent: Int = 50) {
            self.consecutiveFailures = consecutiveFailures
            self.baseEjection = baseEjection
            self.maxEjection = maxEjection
            self.maxEjectionPercent = maxEjectionPercent
        }

        public static var defaults: Settings { Settings() }
    }

    public struct Record: Sendable, Equatable {
        public var consecutiveFailures = 0
        public var ejectedUntil: Nanos?
        /// Ejections so far (the multiplier of the next ejection's length).
        public var ejections = 0
        /// Successes since the last restore: after `consecutiveFailures × 10` the multiplier steps down.
        public var successesSinceRestore = 0
    }

    public var settings: Settings
    public private(set) var records: [String: Record] = [:]

    public init(settings: Settings = .defaults) {
        self.settings = settings
    }

    public func isEjected(_ id: String, now: Nanos) -> Bool {
        guard let until = records[id]?.ejectedUntil else { return false }
        return now < until
    }

    public func ejectedCount(now: Nanos) -> Int {
        records.values.reduce(0) { $0 + (($1.ejectedUntil.map { now < $0 } ?? false) ? 1 : 0) }
    }

    /// Keeps records only for the endpoints that still exist.
    public mutating func retain(ids: Set<String>) {
        records = records.filter { ids.contains($0.key) }
    }

    public mutating func recordSuccess(_ id: String) {
        var record = records[id] ?? Record()
        record.consecutiveFailures = 0
        record.successesSinceRestore += 1
        if record.ejections > 0, record.successesSinceRestore >= max(settings.consecutiveFailures, 1) * 10 {
            record.ejections -= 1
            record.successesSinceRestore = 0
        }
        records[id] = record
    }

    /// Counts a failure; returns true when it ejected the endpoint. `endpointCount` is the upstream's size.
    public mutating func recordFailure(_ id: String, now: Nanos, endpointCount: Int) -> Bool {
        var record = records[id] ?? Record()
        if let until = record.ejectedUntil, now < until {
            return false  // already out (a request that started before the ejection)
        }
        record.ejectedUntil = nil
        record.consecutiveFailures += 1
        record.successesSinceRestore = 0
        defer { records[id] = record }
        guard record.consecutiveFailures >= settings.consecutiveFailures else { return false }
        let ejectedNow = ejectedCount(now: now)
        let cap = max(endpointCount >= 2 ? 1 : 0, endpointCount * settings.maxEjectionPercent / 100)
        guard ejectedNow < cap else { return false }
        record.ejections += 1
        let length = min(settings.baseEjection * Nanos(record.ejections), max(settings.maxEjection, settings.baseEjection))
        record.ejectedUntil = now + length
        record.consecutiveFailures = 0
        return true
    }

    /// Ends ejections whose time is up; returns the ids restored.
    public mutating func restoreExpired(now: Nanos) -> [String] {
        var restored: [String] = []
        for (id, record) in records {
            if let until = record.ejectedUntil, now >= until {
                records[id]!.ejectedUntil = nil
                restored.append(id)
            }
        }
        return restored.sorted()
    }

    /// Brings an endpoint back at once (the registry reports it healthy again after being unhealthy).
    public mutating func restore(_ id: String) {
        records[id]?.ejectedUntil = nil
        records[id]?.consecutiveFailures = 0
    }
}
