import ApusMesh
import Logging
import Synchronization
import Testing
@testable import ApusSidecarCore

@Suite("upstream cluster")
struct UpstreamClusterTests {
    func cluster(_ configure: (inout UpstreamPolicy) -> Void = { _ in }) -> UpstreamCluster {
        var policy = UpstreamPolicy()
        policy.outlier = .init(consecutiveFailures: 2, baseEjection: 1_000_000_000, maxEjection: 10_000_000_000, maxEjectionPercent: 50)
        policy.breaker = .init(consecutiveFailures: 3, coolDown: 1_000_000_000)
        configure(&policy)
        let cluster = UpstreamCluster(name: "test", policy: policy, logger: Logger(label: "test"))
        cluster.update(endpoints: (1...3).map { ServiceEndpoint(id: "e\($0)", address: "127.0.0.1", port: 1000 + $0, protocol: "http") })
        return cluster
    }

    @Test("unhealthy and ejected endpoints get no traffic; ejection ends after its time")
    func ejection() {
        let cluster = cluster()
        cluster.update(endpoints: [
            ServiceEndpoint(id: "e1", address: "127.0.0.1", port: 1001, protocol: "http"),
            ServiceEndpoint(id: "e2", address: "127.0.0.1", port: 1002, protocol: "http", healthy: false),
            ServiceEndpoint(id: "e3", address: "127.0.0.1", port: 1003, protocol: "http"),
            ServiceEndpoint(id: "e4", address: "127.0.0.1", port: 1004, protocol: "http"),
        ])
        var seen = Set<String>()
        for _ in 0..<9 {
            let e = cluster.pick(hashKey: nil, tried: [], now: 0)!
            seen.insert(e.id)
            cluster.attemptEnded(e.id, .success, now: 0)
        }
        #expect(seen == ["e1", "e3", "e4"])
        cluster.attemptEnded("e3", .failure, now: 10)
        cluster.attemptEnded("e3", .failure, now: 11)
        let snapshot = cluster.snapshot(now: 12)
        #expect(snapshot.endpoints.first { $0.id == "e3" }?.ejected == true)
        for _ in 0..<6 { #expect(cluster.pick(hashKey: nil, tried: [], now: 20)?.id != "e3") }
        let later: Nanos = 1_000_000_011
        var back = false
        for _ in 0..<6 where cluster.pick(hashKey: nil, tried: [], now: later)?.id == "e3" { back = true }
        #expect(back)
    }

    @Test("a retry prefers endpoints not tried yet")
    func retryAvoidsTried() {
        let cluster = cluster()
        for _ in 0..<10 {
            let e = cluster.pick(hashKey: nil, tried: ["e1", "e2"], now: 0)!
            #expect(e.id == "e3")
        }
        // All tried: any candidate rather than none.
        #expect(cluster.pick(hashKey: nil, tried: ["e1", "e2", "e3"], now: 0) != nil)
    }

    @Test("breaker and max requests refuse at admission")
    func admission() {
        let cluster = cluster { $0.maxRequests = 2 }
        #expect(cluster.admit(now: 0) == nil)
        #expect(cluster.admit(now: 0) == nil)
        #expect(cluster.admit(now: 0) == .tooManyRequests("test", limit: 2))
        cluster.requestEnded(.failure, code: 503, startedAt: 0, now: 1)
        cluster.requestEnded(.failure, code: 503, startedAt: 0, now: 1)
        #expect(cluster.admit(now: 2) == nil)
        cluster.requestEnded(.failure, code: 503, startedAt: 0, now: 3)
        #expect(cluster.admit(now: 4) == .breakerOpen("test"))
        #expect(cluster.snapshot(now: 4).breaker == "open")
        // After the cool-down one probe goes; its success closes the breaker.
        #expect(cluster.admit(now: 1_000_000_004) == nil)
        #expect(cluster.admit(now: 1_000_000_004) == .breakerOpen("test"))
        cluster.requestEnded(.success, code: 200, startedAt: 0, now: 1_000_000_005)
        #expect(cluster.snapshot(now: 1_000_000_005).breaker == "closed")
        #expect(cluster.admit(now: 1_000_000_006) == nil)
    }

    @Test("least request follows requests in flight")
    func leastRequest() {
        let cluster = cluster { $0.balance = .leastRequest }
        // Ten requests in flight on e1 (the only untried candidate), none released.
        for _ in 0..<10 { #expect(cluster.pick(hashKey: nil, tried: ["e2", "e3"], now: 0)?.id == "e1") }
        // The next ten go to the idle endpoints: e1 loses every comparison.
        var picks: [String] = []
        for _ in 0..<10 { picks.append(cluster.pick(hashKey: nil, tried: [], now: 0)!.id) }
        #expect(!picks.contains("e1"))
        #expect(Set(picks) == ["e2", "e3"])
        #expect(cluster.snapshot(now: 0).endpoints.map(\.inFlight) == [10, picks.filter { $0 == "e2" }.count, picks.filter { $0 == "e3" }.count])
    }
}

@Suite("upstream resolution")
struct UpstreamResolutionTests {
    final class Answers: Sendable {
        private let values = Mutex<[Bool]>([])
        func add(_ v: Bool) { values.withLock { $0.append(v) } }
        var all: [Bool] { values.withLock { $0 } }
    }

    @Test("requests wait for the registry's first answer, fail at once after it timed out, and pass once it answers")
    func resolution() {
        let cluster = UpstreamCluster(name: "late", policy: UpstreamPolicy(), logger: Logger(label: "test"))
        let answers = Answers()
        cluster.whenResolved { answers.add($0) }
        #expect(answers.all.isEmpty)  // waiting
        cluster.resolutionFailed()
        #expect(answers.all == [false])
        cluster.whenResolved { answers.add($0) }
        #expect(answers.all == [false, false])  // no more waiting while the registry is silent
        cluster.update(endpoints: [ServiceEndpoint(id: "a", address: "127.0.0.1", port: 1, protocol: "http")])
        cluster.whenResolved { answers.add($0) }
        #expect(answers.all == [false, false, true])
        #expect(cluster.noEndpointReason == .noEndpoints("late"))
        cluster.update(endpoints: [])
        #expect(cluster.noEndpointReason == .unknownUpstream("late"))
    }
}
