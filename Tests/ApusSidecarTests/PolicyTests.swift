import Testing
@testable import ApusSidecarCore

/// Identity: lets `#expect` check the result of a mutating call (the macro cannot call one on its own).
func value<T>(_ v: T) -> T { v }

@Suite("load balancing")
struct LoadBalancerTests {
    @Test("round robin rotates over the candidates evenly")
    func roundRobin() {
        var lb = LoadBalancer(policy: .roundRobin, seed: 1)
        lb.endpointsChanged(ids: ["a", "b", "c"], weights: [100, 100, 100])
        var counts = [0, 0, 0]
        var sequence: [Int] = []
        for _ in 0..<30 {
            let pick = lb.pick(candidates: [0, 1, 2], weights: [100, 100, 100], active: [], hashKey: nil)!
            counts[pick] += 1
            sequence.append(pick)
        }
        #expect(counts == [10, 10, 10])
        #expect(Set(sequence.prefix(3)) == [0, 1, 2])
    }

    @Test("smooth weighted round robin follows the weights")
    func weighted() {
        var lb = LoadBalancer(policy: .roundRobin, seed: 1)
        lb.endpointsChanged(ids: ["a", "b"], weights: [300, 100])
        var counts = [0, 0]
        for _ in 0..<40 { counts[lb.pick(candidates: [0, 1], weights: [300, 100], active: [], hashKey: nil)!] += 1 }
        #expect(counts == [30, 10])
    }

    @Test("a removed candidate gets nothing; no candidates gives nil")
    func candidatesOnly() {
        var lb = LoadBalancer(policy: .roundRobin, seed: 1)
        lb.endpointsChanged(ids: ["a", "b", "c"], weights: [100, 100, 100])
        for _ in 0..<10 {
            let pick = lb.pick(candidates: [0, 2], weights: [100, 100, 100], active: [], hashKey: nil)!
            #expect(pick != 1)
        }
        #expect(lb.pick(candidates: [], weights: [100, 100, 100], active: [], hashKey: nil) == nil)
    }

    @Test("least request (power of two choices) prefers the less loaded of two")
    func leastRequest() {
        var lb = LoadBalancer(policy: .leastRequest, seed: 42)
        lb.endpointsChanged(ids: ["a", "b"], weights: [100, 100])
        // With two candidates both are always compared: the idle one always wins.
        for _ in 0..<50 { #expect(lb.pick(candidates: [0, 1], weights: [100, 100], active: [7, 0], hashKey: nil) == 1) }
        // With many, the busiest endpoint is never chosen (it loses every comparison).
        var lb4 = LoadBalancer(policy: .leastRequest, seed: 7)
        lb4.endpointsChanged(ids: ["a", "b", "c", "d"], weights: [100, 100, 100, 100])
        var counts = [0, 0, 0, 0]
        for _ in 0..<400 { counts[lb4.pick(candidates: [0, 1, 2, 3], weights: [100, 100, 100, 100], active: [1, 2, 3, 9], hashKey: nil)!] += 1 }
        #expect(counts[3] == 0)
        #expect(counts[0] > counts[1] && counts[1] > counts[2])
    }

    @Test("consistent hash keeps a key on one endpoint and moves only the keys of a removed one")
    func consistentHash() {
        var lb = LoadBalancer(policy: .consistentHash, seed: 1)
        let ids = ["a", "b", "c", "d"]
        let weights = [100, 100, 100, 100]
        lb.endpointsChanged(ids: ids, weights: weights)
        var before: [String: Int] = [:]
        for i in 0..<200 {
            let key = "user-\(i)"
            let first = lb.pick(candidates: [0, 1, 2, 3], weights: weights, active: [], hashKey: key)!
            #expect(lb.pick(candidates: [0, 1, 2, 3], weights: weights, active: [], hashKey: key) == first)
            before[key] = first
        }
        #expect(Set(before.values).count == 4)
        var moved = 0
        for (key, old) in before {
            let now = lb.pick(candidates: [0, 1, 3], weights: weights, active: [], hashKey: key)!
            #expect(now != 2)
            if old != 2 { #expect(now == old) } else { moved += 1 }
        }
        #expect(moved > 0)
    }
}

@Suite("retry budget")
struct RetryBudgetTests {
    let second: Nanos = 1_000_000_000

    @Test("retries stay within 20% of requests above the minimum")
    func ratio() {
        var budget = RetryBudget(settings: .init(ratio: 0.2, minRetries: 2, windowSeconds: 10))
        for _ in 0..<100 { budget.recordRequest(now: 5 * second) }
        var granted = 0
        for _ in 0..<50 where budget.tryRetry(now: 5 * second) { granted += 1 }
        #expect(granted == 20)
    }

    @Test("the minimum allows a few retries on a quiet upstream")
    func minimum() {
        var budget = RetryBudget(settings: .init(ratio: 0.2, minRetries: 3, windowSeconds: 10))
        budget.recordRequest(now: 0)
        #expect(value(budget.tryRetry(now: 0)))
        #expect(value(budget.tryRetry(now: 0)))
        #expect(value(budget.tryRetry(now: 0)))
        #expect(!value(budget.tryRetry(now: 0)))
    }

    @Test("the window slides: old requests and retries stop counting")
    func sliding() {
        var budget = RetryBudget(settings: .init(ratio: 0.2, minRetries: 0, windowSeconds: 10))
        for _ in 0..<50 { budget.recordRequest(now: 0) }
        for _ in 0..<10 { #expect(value(budget.tryRetry(now: 0))) }
        #expect(!value(budget.tryRetry(now: 0)))
        #expect(!value(budget.tryRetry(now: 9 * second)))
        // 10 s later the old second has left the window, and with it its requests and retries.
        #expect(budget.requestsInWindow(now: 10 * second) == 0)
        #expect(!value(budget.tryRetry(now: 10 * second)))
        for _ in 0..<10 { budget.recordRequest(now: 10 * second) }
        #expect(value(budget.tryRetry(now: 10 * second)))
        #expect(value(budget.tryRetry(now: 10 * second)))
        #expect(!value(budget.tryRetry(now: 10 * second)))
    }
}

@Suite("circuit breaker")
struct CircuitBreakerTests {
    @Test("opens after consecutive failures, half-opens after the cool-down, closes on success")
    func transitions() {
        var breaker = CircuitBreaker(settings: .init(consecutiveFailures: 3, coolDown: 1000))
        #expect(value(breaker.allow(now: 0)))
        #expect(!value(breaker.recordFailure(now: 0)))
        breaker.recordSuccess()  // a success resets the run
        #expect(!value(breaker.recordFailure(now: 1)))
        #expect(!value(breaker.recordFailure(now: 2)))
        #expect(value(breaker.recordFailure(now: 3)))
        #expect(breaker.state == .open(until: 1003))
        #expect(!value(breaker.allow(now: 500)))
        #expect(breaker.isRefusing(now: 500))
        // Cool-down over: one probe goes, the next waits for its verdict.
        #expect(value(breaker.allow(now: 1003)))
        #expect(breaker.state == .halfOpen(probeInFlight: true))
        #expect(!value(breaker.allow(now: 1004)))
        breaker.recordSuccess()
        #expect(breaker.state == .closed(failures: 0))
        #expect(value(breaker.allow(now: 1005)))
    }

    @Test("a failed probe opens the breaker for another cool-down")
    func failedProbe() {
        var breaker = CircuitBreaker(settings: .init(consecutiveFailures: 1, coolDown: 100))
        breaker.recordFailure(now: 0)
        #expect(value(breaker.allow(now: 100)))
        #expect(value(breaker.recordFailure(now: 150)))
        #expect(breaker.state == .open(until: 250))
        #expect(!value(breaker.allow(now: 200)))
        #expect(value(breaker.allow(now: 250)))
        breaker.probeAbandoned()
        #expect(value(breaker.allow(now: 251)))
    }
}

@Suite("outlier ejection")
struct OutlierDetectorTests {
    let settings = OutlierDetector.Settings(consecutiveFailures: 3, baseEjection: 1000, maxEjection: 2500, maxEjectionPercent: 50)

    @Test("K consecutive failures eject; the ejection ends after its time")
    func ejectAndRestore() {
        var detector = OutlierDetector(settings: settings)
        #expect(!value(detector.recordFailure("a", now: 0, endpointCount: 3)))
        #expect(!value(detector.recordFailure("a", now: 1, endpointCount: 3)))
        detector.recordSuccess("a")
        #expect(!value(detector.recordFailure("a", now: 2, endpointCount: 3)))
        #expect(!value(detector.recordFailure("a", now: 3, endpointCount: 3)))
        #expect(value(detector.recordFailure("a", now: 4, endpointCount: 3)))
        #expect(detector.isEjected("a", now: 500))
        #expect(!detector.isEjected("b", now: 500))
        #expect(detector.restoreExpired(now: 900).isEmpty)
        #expect(detector.restoreExpired(now: 1004) == ["a"])
        #expect(!detector.isEjected("a", now: 1004))
    }

    @Test("repeated ejections grow, capped at max_ejection")
    func growing() {
        var detector = OutlierDetector(settings: settings)
        var now: Nanos = 0
        var lengths: [Nanos] = []
        for _ in 0..<4 {
            for _ in 0..<3 { _ = detector.recordFailure("a", now: now, endpointCount: 4) }
            let until = detector.records["a"]!.ejectedUntil!
            lengths.append(until - now)
            now = until
            _ = detector.restoreExpired(now: now)
        }
        #expect(lengths == [1000, 2000, 2500, 2500])
    }

    @Test("never ejects more than max_ejection_percent (but one of two may go)")
    func cap() {
        var detector = OutlierDetector(settings: settings)
        for _ in 0..<3 { _ = detector.recordFailure("a", now: 0, endpointCount: 2) }
        #expect(detector.isEjected("a", now: 1))
        for _ in 0..<3 { _ = detector.recordFailure("b", now: 1, endpointCount: 2) }
        #expect(!detector.isEjected("b", now: 2))
        #expect(detector.ejectedCount(now: 2) == 1)
    }

    @Test("an endpoint the registry reports healthy again is restored at once")
    func restoreOnHealth() {
        var detector = OutlierDetector(settings: settings)
        for _ in 0..<3 { _ = detector.recordFailure("a", now: 0, endpointCount: 3) }
        #expect(detector.isEjected("a", now: 10))
        detector.restore("a")
        #expect(!detector.isEjected("a", now: 10))
    }
}

@Suite("token bucket")
struct TokenBucketTests {
    @Test("burst, then the rate")
    func bucket() {
        var bucket = TokenBucket(rate: 10, burst: 3, now: 0)
        #expect(value(bucket.tryTake(now: 0)))
        #expect(value(bucket.tryTake(now: 0)))
        #expect(value(bucket.tryTake(now: 0)))
        #expect(!value(bucket.tryTake(now: 0)))
        #expect(!value(bucket.tryTake(now: 50_000_000)))  // half a token
        #expect(value(bucket.tryTake(now: 100_000_000)))  // 0.1 s at 10/s: one token
        #expect(!value(bucket.tryTake(now: 100_000_000)))
        #expect(value(bucket.tryTake(now: 10_000_000_000)))
        #expect(bucket.isIdle(now: 20_000_000_000))
    }
}

@Suite("inbound limits")
struct InboundLimitsTests {
    @Test("concurrency limit, then per-caller buckets")
    func limits() {
        var config = SidecarConfig.InboundConfig()
        config.maxConcurrency = 2
        config.rateLimit = .init(requestsPerSecond: 1, burst: 2)
        let limits = InboundLimits(config: config)
        #expect(limits.admit(caller: "a", now: 0) == .admitted)
        #expect(limits.admit(caller: "b", now: 0) == .admitted)
        #expect(limits.admit(caller: "c", now: 0) == .overConcurrency(2))
        limits.release()
        limits.release()
        #expect(limits.inFlight == 0)
        // a has one token left of its burst of 2; then it waits a second.
        #expect(limits.admit(caller: "a", now: 1) == .admitted)
        limits.release()
        #expect(limits.admit(caller: "a", now: 2) == .rateLimited(caller: "a", retryAfterSeconds: 1))
        #expect(limits.admit(caller: "c", now: 2) == .admitted)  // another caller, another bucket
        limits.release()
        #expect(limits.admit(caller: "a", now: 1_000_000_002) == .admitted)
        limits.release()
        // A reload without a rate limit lets everyone through (up to the concurrency limit).
        config.rateLimit = nil
        limits.update(config)
        for _ in 0..<2 {
            #expect(limits.admit(caller: "a", now: 1_000_000_003) == .admitted)
            limits.release()
        }
    }
}
