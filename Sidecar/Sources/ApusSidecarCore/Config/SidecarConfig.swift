import ApusMesh
import Foundation
import Yams

/// Everything the sidecar runs with: command-line flags over the YAML file over the defaults.
public struct SidecarConfig: Sendable, Equatable {
    public var registry: String?
    public var address: String = "127.0.0.1"
    public var outboundPort: Int?
    /// Where the outbound listener binds when not `address` (the app's link in its own network namespace).
    public var outboundAddress: String?
    public var inboundPort: Int?
    public var appPort: Int?
    /// The app's address (loopback unless the app has a network namespace of its own).
    public var appAddress: String = "127.0.0.1"
    public var appProtocol: String = "http"
    public var adminPort: Int?
    public var service: String?
    public var instanceID: String?
    public var register: Bool = true
    public var registrationTTLSeconds: Int = 10
    /// How long SIGTERM waits for in-flight requests after deregistering.
    public var drainTimeout: Duration = .seconds(10)
    public var eventLoops: Int = 1
    public var upstreamDefaults = UpstreamPolicy.defaults
    public var upstreams: [String: UpstreamConfig] = [:]
    public var inbound = InboundConfig()

    public init() {}

    public static var defaults: SidecarConfig { SidecarConfig() }

    /// One upstream named in the file: its policy and, for `--registry static`, its endpoints.
    public struct UpstreamConfig: Sendable, Equatable {
        public var policy: UpstreamPolicy
        public var endpoints: [ServiceEndpoint]?

        public init(policy: UpstreamPolicy, endpoints: [ServiceEndpoint]?) {
            self.policy = policy
            self.endpoints = endpoints
        }
    }

    public struct InboundConfig: Sendable, Equatable {
        /// Requests in flight to the app at most; more get 503 (gRPC RESOURCE_EXHAUSTED). 0: no limit.
        public var maxConcurrency: Int = 0
        /// Per-caller token bucket (caller: `x-apus-caller` or source address). nil: no limit.
        public var rateLimit: RateLimit?
        public var healthCheck = HealthCheck()
        /// Budget of one request to the app.
        public var timeout: Duration = .seconds(60)

        public init() {}
    }

    public struct RateLimit: Sendable, Equatable {
        public var requestsPerSecond: Double
        public var burst: Double
    }

    public struct HealthCheck: Sendable, Equatable {
        public enum Kind: String, Sendable { case tcp, http, none }
        public var kind: Kind = .tcp
        public var path: String = "/healthz"
        public var interval: Duration = .seconds(1)
        /// Consecutive failed probes before the instance is reported unhealthy.
        public var unhealthyAfter: Int = 2
    }

    /// The policy an upstream runs with (named in the file, or the defaults).
    public func policy(for upstream: String) -> UpstreamPolicy {
        upstreams[upstream]?.policy ?? upstreamDefaults
    }
}

/// A bad configuration: names the key path and what is wrong with it.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public var path: String
    public var reason: String

    public init(_ path: String, _ reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { path.isEmpty ? reason : "\(path): \(reason)" }
}

extension SidecarConfig {
    /// Parses a YAML document; unknown keys and bad values are refused with their key path.
    public static func parse(yaml text: String) throws(ConfigError) -> SidecarConfig {
        let loaded: Any?
        do {
            loaded = try Yams.load(yaml: text)
        } catch {
            throw ConfigError("", "not valid YAML: \(error)")
        }
        var config = SidecarConfig()
        guard let loaded else { return config }
        let root = try Node(loaded, path: "").map()
        try root.allowOnly(["registry", "address", "outbound_port", "inbound_port", "app_port", "app_protocol", "admin_port",
                            "service", "instance_id", "register", "registration", "drain_timeout", "event_loops",
                            "upstream_defaults", "upstreams", "inbound"])
        if let v = try root.string("registry") { config.registry = v }
        if let v = try root.string("address") { config.address = v }
        config.outboundPort = try root.port("outbound_port")
        config.inboundPort = try root.port("inbound_port")
        config.appPort = try root.port("app_port")
        config.adminPort = try root.port("admin_port")
        if let v = try root.string("app_protocol") {
            guard ["http", "grpc", "thrift"].contains(v) else { throw ConfigError(root.child("app_protocol"), "must be http, grpc or thrift (got \(v))") }
            config.appProtocol = v
        }
        config.service = try root.string("service")
        config.instanceID = try root.string("instance_id")
        if let v = try root.bool("register") { config.register = v }
        if let registration = try root.map("registration") {
            try registration.allowOnly(["ttl"])
            if let ttl = try registration.duration("ttl") {
                let seconds = Int(ttl.components.seconds)
                guard seconds >= 1 else { throw ConfigError(registration.child("ttl"), "must be at least 1s") }
                config.registrationTTLSeconds = seconds
            }
        }
        if let v = try root.duration("drain_timeout") { config.drainTimeout = v }
        if let v = try root.int("event_loops") {
            guard v >= 1 && v <= 64 else { throw ConfigError(root.child("event_loops"), "must be between 1 and 64") }
            config.eventLoops = v
        }
        if let defaults = try root.map("upstream_defaults") {
            config.upstreamDefaults = try parsePolicy(defaults, base: .defaults, allowEndpoints: false)
        }
        if let upstreams = try root.map("upstreams") {
            var thriftPorts: [Int: String] = [:]
            for name in upstreams.keys.sorted() {
                let node = try upstreams.map(name)!
                guard isValidName(name) else { throw ConfigError(node.path, "upstream names are letters, digits, '.', '-', '_'") }
                let policy = try parsePolicy(node, base: config.upstreamDefaults, allowEndpoints: true)
                if let port = policy.thriftPort {
                    if let other = thriftPorts[port] { throw ConfigError(node.child("thrift_port"), "port \(port) is already the thrift_port of \(other)") }
                    thriftPorts[port] = name
                }
                var endpoints: [ServiceEndpoint]?
                if let list = try node.list("endpoints") {
                    endpoints = try list.enumerated().map { index, item throws(ConfigError) in
                        try parseEndpoint(Node(item, path: "\(node.child("endpoints"))[\(index)]").map())
                    }
                }
                config.upstreams[name] = UpstreamConfig(policy: policy, endpoints: endpoints)
            }
        }
        if let inbound = try root.map("inbound") {
            try inbound.allowOnly(["max_concurrency", "rate_limit", "health_check", "timeout"])
            if let v = try inbound.int("max_concurrency") {
                guard v >= 0 else { throw ConfigError(inbound.child("max_concurrency"), "must be 0 (no limit) or more") }
                config.inbound.maxConcurrency = v
            }
            if let v = try inbound.duration("timeout") { config.inbound.timeout = v }
            if let rate = try inbound.map("rate_limit") {
                try rate.allowOnly(["rps", "burst"])
                guard let rps = try rate.double("rps"), rps > 0 else { throw ConfigError(rate.child("rps"), "required, a positive number of requests per second") }
                let burst = try rate.double("burst") ?? max(rps, 1)
                guard burst >= 1 else { throw ConfigError(rate.child("burst"), "must be at least 1") }
                config.inbound.rateLimit = RateLimit(requestsPerSecond: rps, burst: burst)
            }
            if let check = try inbound.map("health_check") {
                try check.allowOnly(["kind", "path", "interval", "unhealthy_after"])
                if let kind = try check.string("kind") {
                    guard let parsed = HealthCheck.Kind(rawValue: kind) else { throw ConfigError(check.child("kind"), "must be tcp, http or none (got \(kind))") }
                    config.inbound.healthCheck.kind = parsed
                }
                if let path = try check.string("path") {
                    guard path.hasPrefix("/") else { throw ConfigError(check.child("path"), "must start with /") }
                    config.inbound.healthCheck.path = path
                }
                if let interval = try check.duration("interval") { config.inbound.healthCheck.interval = interval }
                if let n = try check.int("unhealthy_after") {
                    guard n >= 1 else { throw ConfigError(check.child("unhealthy_after"), "must be at least 1") }
                    config.inbound.healthCheck.unhealthyAfter = n
                }
            }
        }
        return config
    }

    static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { b in
            (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || b == 46 || b == 45 || b == 95
        }
    }

    static func parseEndpoint(_ node: MapNode) throws(ConfigError) -> ServiceEndpoint {
        try node.allowOnly(["id", "address", "port", "protocol", "weight", "zone", "metadata"])
        guard let address = try node.string("address") else { throw ConfigError(node.child("address"), "required") }
        guard let port = try node.port("port"), port > 0 else { throw ConfigError(node.child("port"), "required, 1-65535") }
        let proto = try node.string("protocol") ?? "http"
        guard ["http", "grpc", "thrift", "h2"].contains(proto) else { throw ConfigError(node.child("protocol"), "must be http, h2, grpc or thrift (got \(proto))") }
        let weight = try node.int("weight") ?? 100
        guard weight >= 1 else { throw ConfigError(node.child("weight"), "must be at least 1") }
        var metadata: [String: String] = [:]
        if let meta = try node.map("metadata") {
            for key in meta.keys { metadata[key] = try meta.string(key) }
        }
        return ServiceEndpoint(id: try node.string("id") ?? "\(address):\(port)", address: address, port: port, protocol: proto,
                               weight: weight, zone: try node.string("zone"), metadata: metadata)
    }

    static func parsePolicy(_ node: MapNode, base: UpstreamPolicy, allowEndpoints: Bool) throws(ConfigError) -> UpstreamPolicy {
        var keys: Set<String> = ["balance", "hash_header", "timeout", "retries", "retry_budget", "breaker", "outlier", "max_requests"]
        if allowEndpoints { keys.formUnion(["endpoints", "thrift_port"]) }
        try node.allowOnly(keys)
        var policy = base
        if let v = try node.string("balance") {
            guard let parsed = BalancePolicy(rawValue: v) else {
                throw ConfigError(node.child("balance"), "must be round_robin, least_request or consistent_hash (got \(v))")
            }
            policy.balance = parsed
        }
        if let v = try node.string("hash_header") { policy.hashHeader = v.lowercased() }
        if policy.balance == .consistentHash, policy.hashHeader == nil {
            throw ConfigError(node.child("hash_header"), "required with balance: consistent_hash")
        }
        if let v = try node.duration("timeout") {
            guard v > .zero else { throw ConfigError(node.child("timeout"), "must be positive") }
            policy.timeout = v
        }
        if let v = try node.int("max_requests") {
            guard v >= 1 else { throw ConfigError(node.child("max_requests"), "must be at least 1") }
            policy.maxRequests = v
        }
        if allowEndpoints, let port = try node.port("thrift_port") { policy.thriftPort = port }
        if let retries = try node.map("retries") {
            try retries.allowOnly(["attempts", "retry_safe", "retry_safe_methods", "on"])
            if let v = try retries.int("attempts") {
                guard v >= 1 && v <= 10 else { throw ConfigError(retries.child("attempts"), "must be between 1 and 10") }
                policy.attempts = v
            }
            if let v = try retries.bool("retry_safe") { policy.retrySafe = v }
            if let list = try retries.list("retry_safe_methods") {
                policy.retrySafeMethods = try list.enumerated().map { index, item throws(ConfigError) in
                    guard let s = item as? String, !s.isEmpty else { throw ConfigError("\(retries.child("retry_safe_methods"))[\(index)]", "must be a gRPC path or 'METHOD /path'") }
                    return s
                }
            }
            if let list = try retries.list("on") {
                policy.retryOn = try Set(list.enumerated().map { index, item throws(ConfigError) in
                    guard let code = item as? Int, (500...599).contains(code) else {
                        throw ConfigError("\(retries.child("on"))[\(index)]", "must be a 5xx status")
                    }
                    return code
                })
            }
        }
        if let budget = try node.map("retry_budget") {
            try budget.allowOnly(["ratio", "min_retries", "window"])
            if let v = try budget.double("ratio") {
                guard v >= 0 && v <= 1 else { throw ConfigError(budget.child("ratio"), "must be between 0 and 1") }
                policy.retryBudget.ratio = v
            }
            if let v = try budget.int("min_retries") {
                guard v >= 0 else { throw ConfigError(budget.child("min_retries"), "must be 0 or more") }
                policy.retryBudget.minRetries = v
            }
            if let v = try budget.duration("window") {
                let seconds = Int(v.components.seconds)
                guard seconds >= 1 && seconds <= 300 else { throw ConfigError(budget.child("window"), "must be between 1s and 300s") }
                policy.retryBudget.windowSeconds = seconds
            }
        }
        if let breaker = try node.map("breaker") {
            try breaker.allowOnly(["consecutive_failures", "cool_down", "max_requests"])
            if let v = try breaker.int("consecutive_failures") {
                guard v >= 1 else { throw ConfigError(breaker.child("consecutive_failures"), "must be at least 1") }
                policy.breaker.consecutiveFailures = v
            }
            if let v = try breaker.duration("cool_down") { policy.breaker.coolDown = SidecarClock.nanos(v) }
            if let v = try breaker.int("max_requests") {
                guard v >= 1 else { throw ConfigError(breaker.child("max_requests"), "must be at least 1") }
                policy.maxRequests = v
            }
        }
        if let outlier = try node.map("outlier") {
            try outlier.allowOnly(["consecutive_failures", "base_ejection", "max_ejection", "max_ejection_percent"])
            if let v = try outlier.int("consecutive_failures") {
                guard v >= 1 else { throw ConfigError(outlier.child("consecutive_failures"), "must be at least 1") }
                policy.outlier.consecutiveFailures = v
            }
            if let v = try outlier.duration("base_ejection") { policy.outlier.baseEjection = SidecarClock.nanos(v) }
            if let v = try outlier.duration("max_ejection") { policy.outlier.maxEjection = SidecarClock.nanos(v) }
            if let v = try outlier.int("max_ejection_percent") {
                guard v >= 0 && v <= 100 else { throw ConfigError(outlier.child("max_ejection_percent"), "must be between 0 and 100") }
                policy.outlier.maxEjectionPercent = v
            }
        }
        return policy
    }
}

/// A position in the parsed YAML with its key path, for error messages.
struct Node {
    let value: Any
    let path: String

    init(_ value: Any, path: String) {
        self.value = value
        self.path = path
    }

    func child(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func map() throws(ConfigError) -> MapNode {
        guard let dict = value as? [String: Any] else {
            if let any = value as? [AnyHashable: Any] {
                var out: [String: Any] = [:]
                for (k, v) in any { out["\(k)"] = v }
                return MapNode(dict: out, path: path)
            }
            throw ConfigError(path, "must be a mapping")
        }
        return MapNode(dict: dict, path: path)
    }
}

struct MapNode {
    let dict: [String: Any]
    let path: String

    var keys: [String] { Array(dict.keys) }

    func child(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func allowOnly(_ allowed: Set<String>) throws(ConfigError) {
        for key in dict.keys.sorted() where !allowed.contains(key) {
            throw ConfigError(child(key), "unknown key (expected one of: \(allowed.sorted().joined(separator: ", ")))")
        }
    }

    private func present(_ key: String) -> Any? {
        guard let v = dict[key], !(v is NSNull) else { return nil }
        return v
    }

    func string(_ key: String) throws(ConfigError) -> String? {
        guard let v = present(key) else { return nil }
        if let s = v as? String { return s }
        if let i = v as? Int { return String(i) }
        throw ConfigError(child(key), "must be a string")
    }

    func int(_ key: String) throws(ConfigError) -> Int? {
        guard let v = present(key) else { return nil }
        if let i = v as? Int { return i }
        if let s = v as? String, let i = Int(s) { return i }
        throw ConfigError(child(key), "must be an integer")
    }

    func double(_ key: String) throws(ConfigError) -> Double? {
        guard let v = present(key) else { return nil }
        if let d = v as? Double { return d }
        if let i = v as? Int { return Double(i) }
        if let s = v as? String, let d = Double(s) { return d }
        throw ConfigError(child(key), "must be a number")
    }

    func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let v = present(key) else { return nil }
        if let b = v as? Bool { return b }
        throw ConfigError(child(key), "must be true or false")
    }

    func port(_ key: String) throws(ConfigError) -> Int? {
        guard let p = try int(key) else { return nil }
        guard p >= 0 && p <= 65535 else { throw ConfigError(child(key), "must be a port number (0-65535)") }
        return p
    }

    func duration(_ key: String) throws(ConfigError) -> Duration? {
        guard let v = present(key) else { return nil }
        if let i = v as? Int { return .seconds(i) }
        if let d = v as? Double { return .milliseconds(Int64(d * 1000)) }
        guard let s = v as? String, let parsed = parseDuration(s) else {
            throw ConfigError(child(key), "must be a duration like 250ms, 2s or 1m")
        }
        return parsed
    }

    func map(_ key: String) throws(ConfigError) -> MapNode? {
        guard let v = present(key) else { return nil }
        return try Node(v, path: child(key)).map()
    }

    func list(_ key: String) throws(ConfigError) -> [Any]? {
        guard let v = present(key) else { return nil }
        guard let list = v as? [Any] else { throw ConfigError(child(key), "must be a list") }
        return list
    }
}

/// `250ms`, `2s`, `1.5s`, `1m`, `100us`; nil when malformed or negative.
public func parseDuration(_ text: String) -> Duration? {
    let units: [(String, Double)] = [("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("ns", 1e-9), ("s", 1), ("m", 60), ("h", 3600)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
        guard let number = Double(text.dropLast(suffix.count)), number >= 0 else { return nil }
        return .nanoseconds(Int64(number * scale * 1e9))
    }
    return nil
}
