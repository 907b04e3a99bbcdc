import ApusMesh
import Logging
import NIOCore
import Synchronization

/// Why a request was refused before reaching any endpoint.
public enum Refusal: Error, Equatable, Sendable {
    case breakerOpen(String)
    case tooManyRequests(String, limit: Int)
    case noEndpoints(String)
    case unknownUpstream(String)
    case registryUnavailable(String)

    public var message: String {
        switch self {
        case .breakerOpen(let name): "circuit breaker open for upstream \(name): too many consecutive failures, retry later"
        case .tooManyRequests(let name, let limit): "upstream \(name) has \(limit) requests in flight (max_requests): refused"
        case .noEndpoints(let name): "upstream \(name) has no healthy endpoints"
        case .unknownUpstream(let name): "no upstream named \(name) in the registry (no endpoints registered)"
        case .registryUnavailable(let name): "the registry has not answered about upstream \(name) yet"
        }
    }
}

/// How one attempt ended, as the policies see it.
public enum AttemptOutcome: Sendable, Equatable {
    case success
    /// Connect failure, reset before the response, a timeout, or a retryable 5xx: counts towards ejection.
    case failure
    /// Neither (the client left): no verdict.
    case abandoned
}

/// One upstream's live state: endpoints from the registry, balancer, breaker, outlier ejection, retry budget and
/// requests in flight, behind one lock (held for a few hundred nanoseconds per request, never across I/O).
public final class UpstreamCluster: Sendable {
    public let name: String
    let metrics: UpstreamMetrics

    struct State {
        var policy: UpstreamPolicy
        var endpoints: [ServiceEndpoint] = []
        var weights: [Int] = []
        var active: [String: Int] = [:]
        var balancer: LoadBalancer
        var breaker: CircuitBreaker
        var outlier: OutlierDetector
        var budget: RetryBudget
        var inFlight = 0
        var resolved = false
        /// The registry did not answer in time: requests fail at once until it does.
        var unreachable = false
        var nextRestoreCheck: Nanos = 0
        var waiters: [@Sendable (Bool) -> Void] = []
    }

    private let state: Mutex<State>
    private let logger: Logger

    public init(name: String, policy: UpstreamPolicy, metricsPrefix: String = "apus_sidecar_upstream", logger: Logger) {
        self.name = name
        self.metrics = UpstreamMetrics(upstream: name, prefix: metricsPrefix)
        var logger = logger
        logger[metadataKey: "upstream"] = "\(name)"
        self.logger = logger
        self.state = Mutex(State(
            policy: policy, balancer: LoadBalancer(policy: policy.balance), breaker: CircuitBreaker(settings: policy.breaker),
            outlier: OutlierDetector(settings: policy.outlier), budget: RetryBudget(settings: policy.retryBudget)))
    }

    public var policy: UpstreamPolicy { state.withLock { $0.policy } }

    /// Why `pick` found nothing: no endpoint registered at all, or none healthy and in rotation.
    public var noEndpointReason: Refusal {
        state.withLock { $0.endpoints.isEmpty } ? .unknownUpstream(name) : .noEndpoints(name)
    }

    /// Endpoints have been heard from the registry at least once.
    public var isResolved: Bool { state.withLock { $0.resolved } }

    /// Applies a changed policy (reload); counters and ejections carry over where they still make sense.
    public func update(policy: UpstreamPolicy) {
        state.withLock { state in
            guard state.policy != policy else { return }
            if state.policy.balance != policy.balance {
                state.balancer = LoadBalancer(policy: policy.balance)
                state.balancer.endpointsChanged(ids: state.endpoints.map(\.id), weights: state.weights)
            }
            state.breaker.settings = policy.breaker
            state.outlier.settings = policy.outlier
            if state.policy.retryBudget != policy.retryBudget { state.budget = RetryBudget(settings: policy.retryBudget) }
            state.policy = policy
        }
    }

    /// The registry's current endpoint list (healthy and not).
    public func update(endpoints: [ServiceEndpoint]) {
        let waiters = state.withLock { state -> [@Sendable (Bool) -> Void] in
            let previous = Dictionary(state.endpoints.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
            state.endpoints = endpoints
            state.weights = endpoints.map(\.weight)
            state.balancer.endpointsChanged(ids: endpoints.map(\.id), weights: state.weights)
            state.outlier.retain(ids: Set(endpoints.map(\.id)))
            for endpoint in endpoints where endpoint.healthy && previous[endpoint.id]?.healthy == false {
                state.outlier.restore(endpoint.id)  // it reports itself healthy again
            }
            state.resolved = true
            defer { state.waiters = [] }
            return state.waiters
        }
        logger.info("endpoints updated", metadata: ["endpoints": "\(endpoints.map { "\($0.address):\($0.port)\($0.healthy ? "" : "(unhealthy)")" })"])
        for waiter in waiters { waiter(true) }
    }

    /// Runs `body` once endpoints are known (now, or when the registry first answers; false on timeout).
    func whenResolved(_ body: @escaping @Sendable (Bool) -> Void) {
        let answer = state.withLock { state -> Bool? in
            if state.resolved { return true }
            if state.unreachable { return false }
            state.waiters.append(body)
            return nil
        }
        if let answer { body(answer) }
    }

    /// The registry could not be reached for this upstream: waiting requests fail.
    func resolutionFailed() {
        let waiters = state.withLock { state -> [@Sendable (Bool) -> Void] in
            defer { state.waiters = [] }
            state.unreachable = !state.resolved
            return state.waiters
        }
        for waiter in waiters { waiter(false) }
    }

    /// Admits a request (max requests, breaker). On success the caller must call `requestEnded` exactly once.
    public func admit(now: Nanos) -> Refusal? {
        let refusal = state.withLock { state -> Refusal? in
            guard state.inFlight < state.policy.maxRequests else { return .tooManyRequests(name, limit: state.policy.maxRequests) }
            guard state.breaker.allow(now: now) else { return .breakerOpen(name) }
            state.inFlight += 1
            state.budget.recordRequest(now: now)
            return nil
        }
        if refusal != nil { metrics.recordRequest(code: 503, nanoseconds: 0) }
        return refusal
    }

    /// Chooses an endpoint for one attempt (healthy, not ejected, preferring ones this request has not tried).
    public func pick(hashKey: String?, tried: [String], now: Nanos) -> ServiceEndpoint? {
        let (endpoint, restored) = state.withLock { state -> (ServiceEndpoint?, [String]) in
            var restored: [String] = []
            if now >= state.nextRestoreCheck {
                restored = state.outlier.restoreExpired(now: now)
                state.nextRestoreCheck = now + 100_000_000
            }
            var candidates: [Int] = []
            var fallback: [Int] = []
            candidates.reserveCapacity(state.endpoints.count)
            for (index, endpoint) in state.endpoints.enumerated() where endpoint.healthy {
                if state.outlier.isEjected(endpoint.id, now: now) { continue }
                if !tried.isEmpty, tried.contains(endpoint.id) { fallback.append(index) } else { candidates.append(index) }
            }
            if candidates.isEmpty { candidates = fallback }
            let active = state.policy.balance == .leastRequest ? state.endpoints.map { state.active[$0.id] ?? 0 } : []
            guard let index = state.balancer.pick(candidates: candidates, weights: state.weights, active: active, hashKey: hashKey) else {
                return (nil, restored)
            }
            let endpoint = state.endpoints[index]
            state.active[endpoint.id, default: 0] += 1
            return (endpoint, restored)
        }
        for id in restored { logger.info("endpoint restored after ejection", metadata: ["endpoint": "\(id)"]) }
        return endpoint
    }

    /// One attempt on `endpointID` ended.
    public func attemptEnded(_ endpointID: String, _ outcome: AttemptOutcome, now: Nanos) {
        let ejected = state.withLock { state -> Bool in
            if let count = state.active[endpointID] { state.active[endpointID] = count > 1 ? count - 1 : nil }
            switch outcome {
            case .success:
                state.outlier.recordSuccess(endpointID)
                return false
            case .failure:
                return state.outlier.recordFailure(endpointID, now: now, endpointCount: state.endpoints.count)
            case .abandoned:
                return false
            }
        }
        if ejected {
            metrics.ejections.increment()
            logger.warning("endpoint ejected after consecutive failures", metadata: ["endpoint": "\(endpointID)"])
        }
    }

    /// Takes a retry from the budget.
    public func tryRetry(now: Nanos) -> Bool {
        let allowed = state.withLock { $0.budget.tryRetry(now: now) }
        if allowed { metrics.retries.increment() }
        return allowed
    }

    /// The request admitted by `admit` ended with `code` (HTTP status; gRPC calls map to one).
    public func requestEnded(_ outcome: AttemptOutcome, code: Int, startedAt: Nanos, now: Nanos) {
        let (opened, closed) = state.withLock { state -> (Bool, Bool) in
            state.inFlight -= 1
            let before = state.breaker.state.name
            switch outcome {
            case .success:
                state.breaker.recordSuccess()
                return (false, before != "closed")
            case .failure:
                return (state.breaker.recordFailure(now: now), false)
            case .abandoned:
                state.breaker.probeAbandoned()
                return (false, false)
            }
        }
        metrics.recordRequest(code: code, nanoseconds: now > startedAt ? now - startedAt : 0)
        if opened {
            metrics.breakerOpen.record(1)
            logger.warning("circuit breaker opened")
        } else if closed {
            metrics.breakerOpen.record(0)
            logger.info("circuit breaker closed")
        }
    }

    /// The upstream's state for `GET /upstreams`.
    public func snapshot(now: Nanos) -> UpstreamSnapshot {
        state.withLock { state in
            _ = state.outlier.restoreExpired(now: now)
            let breaker: String
            var reopensInMs: Int?
            switch state.breaker.state {
            case .closed: breaker = "closed"
            case .open(let until):
                if now >= until {
                    breaker = "half_open"
                } else {
                    breaker = "open"
                    reopensInMs = Int((until - now) / 1_000_000)
                }
            case .halfOpen: breaker = "half_open"
            }
            return UpstreamSnapshot(
                name: name, balance: state.policy.balance.rawValue, inFlight: state.inFlight, breaker: breaker,
                breakerHalfOpensInMs: reopensInMs,
                retriesInWindow: state.budget.retriesInWindow(now: now), requestsInWindow: state.budget.requestsInWindow(now: now),
                endpoints: state.endpoints.map { endpoint in
                    let record = state.outlier.records[endpoint.id]
                    let ejected = state.outlier.isEjected(endpoint.id, now: now)
                    return UpstreamSnapshot.Endpoint(
                        id: endpoint.id, address: endpoint.address, port: endpoint.port, protocol: endpoint.protocol,
                        weight: endpoint.weight, zone: endpoint.zone, healthy: endpoint.healthy, ejected: ejected,
                        ejectedForMs: ejected ? Int((record!.ejectedUntil! - now) / 1_000_000) : nil,
                        ejections: record?.ejections ?? 0, consecutiveFailures: record?.consecutiveFailures ?? 0,
                        inFlight: state.active[endpoint.id] ?? 0)
                })
        }
    }
}

/// What `GET /upstreams` shows for one upstream.
public struct UpstreamSnapshot: Codable, Sendable {
    public struct Endpoint: Codable, Sendable {
        public var id: String
        public var address: String
        public var port: Int
        public var `protocol`: String
        public var weight: Int
        public var zone: String?
        public var healthy: Bool
        public var ejected: Bool
        public var ejectedForMs: Int?
        public var ejections: Int
        public var consecutiveFailures: Int
        public var inFlight: Int
    }

    public var name: String
    public var balance: String
    public var inFlight: Int
    public var breaker: String
    public var breakerHalfOpensInMs: Int?
    public var retriesInWindow: Int
    public var requestsInWindow: Int
    public var endpoints: [Endpoint]
}
