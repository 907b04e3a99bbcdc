import ApusMesh
import Testing
@testable import ApusSidecarCore

@Suite("configuration")
struct ConfigTests {
    @Test("a full file parses")
    func full() throws {
        let config = try SidecarConfig.parse(yaml: """
            registry: static
            outbound_port: 15001
            admin_port: 15000
            service: checkout
            upstream_defaults:
              timeout: 2s
              retries: {attempts: 2}
            upstreams:
              payments:
                balance: consistent_hash
                hash_header: X-User
                endpoints:
                  - {address: 127.0.0.1, port: 9001, protocol: http, weight: 200, zone: a}
                  - {address: 127.0.0.1, port: 9002}
                outlier: {consecutive_failures: 2, base_ejection: 500ms, max_ejection_percent: 100}
                breaker: {consecutive_failures: 4, cool_down: 1s, max_requests: 10}
                retry_budget: {ratio: 0.1, min_retries: 5, window: 5s}
              echo:
                thrift_port: 15100
                retries: {retry_safe_methods: [/echo.Echo/Get, "POST /idempotent"]}
            inbound:
              max_concurrency: 8
              rate_limit: {rps: 5, burst: 10}
              health_check: {kind: http, path: /ready, interval: 500ms}
            """)
        #expect(config.registry == "static")
        #expect(config.outboundPort == 15001)
        let payments = try #require(config.upstreams["payments"])
        #expect(payments.policy.balance == .consistentHash)
        #expect(payments.policy.hashHeader == "x-user")
        #expect(payments.policy.timeout == .seconds(2))
        #expect(payments.policy.attempts == 2)
        #expect(payments.policy.maxRequests == 10)
        #expect(payments.policy.breaker == .init(consecutiveFailures: 4, coolDown: 1_000_000_000))
        #expect(payments.policy.outlier.baseEjection == 500_000_000)
        #expect(payments.policy.retryBudget == .init(ratio: 0.1, minRetries: 5, windowSeconds: 5))
        #expect(payments.endpoints?.map(\.id) == ["127.0.0.1:9001", "127.0.0.1:9002"])
        #expect(payments.endpoints?.first?.weight == 200)
        #expect(payments.endpoints?.first?.zone == "a")
        let echo = try #require(config.upstreams["echo"])
        #expect(echo.policy.thriftPort == 15100)
        #expect(echo.policy.mayRetry(method: "POST", path: "/echo.Echo/Get", grpc: true))
        #expect(!echo.policy.mayRetry(method: "POST", path: "/echo.Echo/Expand", grpc: true))
        #expect(echo.policy.mayRetry(method: "POST", path: "/idempotent/x", grpc: false))
        #expect(!echo.policy.mayRetry(method: "POST", path: "/other", grpc: false))
        #expect(echo.policy.mayRetry(method: "GET", path: "/other", grpc: false))
        #expect(config.inbound.maxConcurrency == 8)
        #expect(config.inbound.rateLimit == .init(requestsPerSecond: 5, burst: 10))
        #expect(config.inbound.healthCheck.kind == .http)
        #expect(config.inbound.healthCheck.interval == .milliseconds(500))
        #expect(config.policy(for: "unnamed").timeout == .seconds(2))
    }

    @Test("bad values name their key path", arguments: [
        ("upstreams: {a: {balance: random}}", "upstreams.a.balance"),
        ("upstreams: {a: {timeout: soon}}", "upstreams.a.timeout"),
        ("upstreams: {a: {endpoints: [{address: x}]}}", "upstreams.a.endpoints[0].port"),
        ("upstreams: {a: {endpoints: [{address: x, port: 99999}]}}", "upstreams.a.endpoints[0].port"),
        ("upstreams: {a: {endpoints: [{address: x, port: 1, protocol: smtp}]}}", "upstreams.a.endpoints[0].protocol"),
        ("upstreams: {a: {retries: {attempts: 0}}}", "upstreams.a.retries.attempts"),
        ("upstreams: {a: {balance: consistent_hash}}", "upstreams.a.hash_header"),
        ("upstreams: {a: {outlier: {max_ejection_percent: 150}}}", "upstreams.a.outlier.max_ejection_percent"),
        ("upstreams: {a: {colour: blue}}", "upstreams.a.colour"),
        ("upstreams: {a: {thrift_port: 9000}, b: {thrift_port: 9000}}", "upstreams.b.thrift_port"),
        ("inbound: {rate_limit: {burst: 3}}", "inbound.rate_limit.rps"),
        ("inbound: {health_check: {kind: ping}}", "inbound.health_check.kind"),
        ("upstream_defaults: {endpoints: []}", "upstream_defaults.endpoints"),
        ("outbound_port: lots", "outbound_port"),
        ("unknown_key: 1", "unknown_key"),
        ("upstreams: [a, b]", "upstreams"),
    ])
    func errors(yaml: String, path: String) {
        #expect {
            _ = try SidecarConfig.parse(yaml: yaml)
        } throws: { error in
            guard let error = error as? ConfigError else { return false }
            return error.path == path && !error.reason.isEmpty
        }
    }

    @Test("durations")
    func durations() {
        #expect(parseDuration("250ms") == .milliseconds(250))
        #expect(parseDuration("2s") == .seconds(2))
        #expect(parseDuration("1.5s") == .milliseconds(1500))
        #expect(parseDuration("1m") == .seconds(60))
        #expect(parseDuration("fast") == nil)
        #expect(parseDuration("-1s") == nil)
    }

    @Test("gRPC timeouts")
    func grpcTimeout() {
        #expect(HTTP2StreamProxy.parseGRPCTimeout("100m") == 100_000_000)
        #expect(HTTP2StreamProxy.parseGRPCTimeout("2S") == 2_000_000_000)
        #expect(HTTP2StreamProxy.parseGRPCTimeout("5") == nil)
        #expect(HTTP2StreamProxy.parseGRPCTimeout("123456789m") == nil)
    }
}

@Suite("static registry")
struct StaticRegistryTests {
    @Test("watch delivers the list now and after a reload; registrations expire and deregister")
    func watchAndLease() async throws {
        let registry = StaticRegistry(services: ["a": [ServiceEndpoint(id: "1", address: "127.0.0.1", port: 1, protocol: "http")]])
        var iterator = registry.watch("a").makeAsyncIterator()
        #expect(try await iterator.next()?.map(\.id) == ["1"])
        registry.replace(services: ["a": [ServiceEndpoint(id: "2", address: "127.0.0.1", port: 2, protocol: "http")]])
        #expect(try await iterator.next()?.map(\.id) == ["2"])
        let lease = try await registry.register(service: "a", endpoint: ServiceEndpoint(id: "3", address: "127.0.0.1", port: 3, protocol: "http"), ttlSeconds: 5)
        #expect(try await iterator.next()?.map(\.id) == ["2", "3"])
        try await registry.setHealth(lease, healthy: false)
        #expect(try await iterator.next()?.last?.healthy == false)
        try await registry.heartbeat(lease)
        try await registry.deregister(lease)
        #expect(try await iterator.next()?.map(\.id) == ["2"])
        await #expect(throws: RegistryError.leaseNotFound(lease.leaseID)) { try await registry.heartbeat(lease) }
        #expect(try await registry.services().map(\.name) == ["a"])
    }

    @Test("registryFor: static is built in, other URLs go to the factory")
    func seam() throws {
        let config = SidecarConfig()
        #expect(try registryFor(url: "static", config: config) { _ in throw SidecarError("no") } is StaticRegistry)
        #expect(throws: SidecarError.self) { _ = try registryFor(url: "http://127.0.0.1:7070", config: config) { _ in throw SidecarError("no") } }
    }
}
