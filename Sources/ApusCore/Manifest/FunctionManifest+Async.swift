import Foundation

extension FunctionManifest {
    /// `async:` in `apus.yaml`: how the function runs as asynchronous tasks (submitted, persisted, dispatched with
    /// a budget of their own). `async: true` takes every default.
    public struct AsyncSettings: Codable, Hashable, Sendable {
        /// Tasks of this function running at once (a budget separate from synchronous traffic).
        public var concurrency: Int
        /// Longest a single attempt may run (up to 24h).
        public var timeout: Duration
        /// Further attempts after a failed, timed-out or lost one.
        public var retries: Int
        /// Delay before the first retry; doubled for each further one.
        public var backoff: Duration
        /// The longest delay between attempts.
        public var maxBackoff: Duration
        /// A task not started (or retried) this long after submission expires into the dead-letter list.
        public var maxAge: Duration
        /// Task starts per second (nil: unlimited).
        public var rate: Double?
        /// Receives every finished task's outcome as a JSON POST (a task's own callback wins).
        public var callback: String?
        /// Longest silence between progress reports before a running task counts as lost (nil: no heartbeats).
        public var heartbeat: Duration?

        public init(concurrency: Int = 4, timeout: Duration = .seconds(900), retries: Int = 2, backoff: Duration = .seconds(1),
                    maxBackoff: Duration = .seconds(300), maxAge: Duration = .seconds(6 * 3600), rate: Double? = nil,
                    callback: String? = nil, heartbeat: Duration? = nil) {
            self.concurrency = concurrency
            self.timeout = timeout
            self.retries = retries
            self.backoff = backoff
            self.maxBackoff = maxBackoff
            self.maxAge = maxAge
            self.rate = rate
            self.callback = callback
            self.heartbeat = heartbeat
        }

        public static let defaults = AsyncSettings()

        enum CodingKeys: String, CodingKey {
            case concurrency, timeout, retries, backoff, maxBackoff = "max_backoff", maxAge = "max_age", rate, callback, heartbeat
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            func duration(_ key: CodingKeys) throws -> Duration? {
                guard let text = try c.decodeIfPresent(String.self, forKey: key) else { return nil }
                guard let value = Duration(humanReadable: text) else {
                    throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "bad duration \(text)")
                }
                return value
            }
            concurrency = try c.decode(Int.self, forKey: .concurrency)
            timeout = try duration(.timeout) ?? .seconds(900)
            retries = try c.decode(Int.self, forKey: .retries)
            backoff = try duration(.backoff) ?? .seconds(1)
            maxBackoff = try duration(.maxBackoff) ?? .seconds(300)
            maxAge = try duration(.maxAge) ?? .seconds(6 * 3600)
            rate = try c.decodeIfPresent(Double.self, forKey: .rate)
            callback = try c.decodeIfPresent(String.self, forKey: .callback)
            heartbeat = try duration(.heartbeat)
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(concurrency, forKey: .concurrency)
            try c.encode(timeout.humanReadable, forKey: .timeout)
            try c.encode(retries, forKey: .retries)
            try c.encode(backoff.humanReadable, forKey: .backoff)
            try c.encode(maxBackoff.humanReadable, forKey: .maxBackoff)
            try c.encode(maxAge.humanReadable, forKey: .maxAge)
            try c.encodeIfPresent(rate, forKey: .rate)
            try c.encodeIfPresent(callback, forKey: .callback)
            try c.encodeIfPresent(heartbeat?.humanReadable, forKey: .heartbeat)
        }
    }

    /// The task settings in force: the manifest's, or the defaults when it has no `async:`.
    public var asyncSettings: AsyncSettings { self.async ?? .defaults }

    /// Reads `async: true | false | {concurrency, timeout, retries, backoff, max_backoff, max_age, rate, callback, heartbeat}`.
    static func asyncSettings(_ reader: ManifestReader) throws(ApusError) -> AsyncSettings? {
        guard reader.has("async") else { return nil }
        if let flag = try? reader.optionalString("async") {
            switch flag.lowercased() {
            case "true", "yes", "on": return .defaults
            case "false", "no", "off": return nil
            default: throw ManifestReader.failure("async", "must be true, false or a mapping of task settings (got \"\(flag)\")")
            }
        }
        guard let mapping = try reader.optionalMapping("async") else { return nil }
        let settings = ManifestReader(mapping: mapping, path: "async")
        try settings.rejectUnknownKeys(allowed: ["concurrency", "timeout", "retries", "backoff", "max_backoff", "max_age", "rate", "callback", "heartbeat"])
        var result = AsyncSettings.defaults
        if let concurrency = try settings.optionalInt("concurrency") {
            guard (1...10_000).contains(concurrency) else {
                throw ManifestReader.failure("async.concurrency", "must be between 1 and 10000 (got \(concurrency))")
            }
            result.concurrency = concurrency
        }
        func duration(_ key: String, _ range: ClosedRange<Duration>, _ rangeText: String) throws(ApusError) -> Duration? {
            guard let text = try settings.optionalString(key) else { return nil }
            guard let value = Duration(humanReadable: text) else {
                throw ManifestReader.failure("async.\(key)", "must be a duration such as 500ms, 30s, 5m or 2h (got \"\(text)\")")
            }
            guard range.contains(value) else {
                throw ManifestReader.failure("async.\(key)", "must be between \(rangeText) (got \(text))")
            }
            return value
        }
        if let value = try duration("timeout", .milliseconds(10) ... .seconds(86_400), "10ms and 24h") { result.timeout = value }
        if let retries = try settings.optionalInt("retries") {
            guard (0...100).contains(retries) else {
                throw ManifestReader.failure("async.retries", "must be between 0 and 100 (got \(retries))")
            }
            result.retries = retries
        }
        if let value = try duration("backoff", .milliseconds(1) ... .seconds(86_400), "1ms and 24h") { result.backoff = value }
        if let value = try duration("max_backoff", .milliseconds(1) ... .seconds(86_400), "1ms and 24h") { result.maxBackoff = value }
        guard result.maxBackoff >= result.backoff else {
            throw ManifestReader.failure("async.max_backoff", "must be ≥ async.backoff (got \(result.maxBackoff.humanReadable) < \(result.backoff.humanReadable))")
        }
        if let value = try duration("max_age", .seconds(1) ... .seconds(14 * 86_400), "1s and 14 days (336h)") { result.maxAge = value }
        if let text = try settings.optionalString("rate") {
            guard let rate = parseRate(text) else {
                throw ManifestReader.failure("async.rate", "must be task starts per second, or N/s, N/m, N/h, with N > 0 (got \"\(text)\")")
            }
            result.rate = rate
        }
        if let url = try settings.optionalString("callback") {
            guard isCallbackURL(url) else {
                throw ManifestReader.failure("async.callback", "must be an http:// or https:// URL (got \"\(url)\")")
            }
            result.callback = url
        }
        if let value = try duration("heartbeat", .milliseconds(100) ... .seconds(86_400), "100ms and 24h") { result.heartbeat = value }
        return result
    }

    /// `5`, `0.5`, `10/s`, `600/m` or `100/h`, as starts per second.
    public static func parseRate(_ text: String) -> Double? {
        let parts = text.replacingOccurrences(of: " ", with: "").split(separator: "/", omittingEmptySubsequences: false)
        guard let first = parts.first, let count = Double(first), count > 0, count.isFinite, parts.count <= 2 else { return nil }
        guard parts.count == 2 else { return count }
        switch parts[1] {
        case "s": return count
        case "m": return count / 60
        case "h": return count / 3600
        default: return nil
        }
    }

    /// An absolute http(s) URL with a host.
    public static func isCallbackURL(_ text: String) -> Bool {
        guard text.utf8.count <= 2048, let url = URL(string: text), let scheme = url.scheme?.lowercased(),
              scheme == "http" || scheme == "https", let host = url.host, !host.isEmpty else { return false }
        return true
    }
}
