/// How the sidecar treats one upstream: balancing, timeout, retries, breaker, ejection. Every upstream starts
/// from `upstream_defaults` in the config file (or the built-in defaults) and overrides what it names.
public struct UpstreamPolicy: Sendable, Equatable {
    public var balance: BalancePolicy = .roundRobin
    /// The request header whose value keys `consistent_hash` (lower case).
    public var hashHeader: String?
    /// Per-attempt budget of the whole call (all attempts together), also sent on as the deadline.
    public var timeout: Duration = .seconds(15)
    /// Attempts at most (the first one included).
    public var attempts: Int = 3
    /// Every call to this upstream may be retried (a service whose calls are all idempotent).
    public var retrySafe: Bool = false
    /// Calls declared retry-safe: gRPC paths (`/pkg.Service/Method`) or HTTP `METHOD /path` (path prefix).
    public var retrySafeMethods: [String] = []
    /// Retry statuses: 502/503/504 (and gRPC UNAVAILABLE).
    public var retryOn: Set<Int> = [502, 503, 504]
    public var retryBudget = RetryBudget.Settings.defaults
    /// Requests in flight at most; more are answered 503 at once.
    public var maxRequests: Int = 1024
    public var breaker = CircuitBreaker.Settings.defaults
    public var outlier = OutlierDetector.Settings.defaults
    /// A Thrift listener for this upstream (the app connects there instead of naming the upstream).
    public var thriftPort: Int?

    public init() {}

    public static var defaults: UpstreamPolicy { UpstreamPolicy() }

    static let idempotentMethods: Set<String> = ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"]

    /// Whether a call may be sent again after it reached an endpoint.
    public func mayRetry(method: String, path: String, grpc: Bool) -> Bool {
        if retrySafe { return true }
        if !grpc, Self.idempotentMethods.contains(method) { return true }
        for entry in retrySafeMethods {
            if grpc {
                if entry == path { return true }
            } else if let space = entry.firstIndex(of: " ") {
                if entry[..<space] == method && path.hasPrefix(entry[entry.index(after: space)...]) { return true }
            } else if path.hasPrefix(entry) {
                return true
            }
        }
        return false
    }
}
