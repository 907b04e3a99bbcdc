import ApusControl
import ApusMesh
import Hummingbird
import HummingbirdTesting
import Logging
import Testing

/// `RegistryHTTPClient` (what sidecars use) against the real registry routes over an embedded registry, on a live
/// loopback server: every `ServiceRegistry` operation round-trips, errors come back typed, watches long-poll.
@Suite("registry API with its HTTP client")
struct RegistryAPIClientTests {
    func withClient(_ body: @escaping @Sendable (EmbeddedRegistry, RegistryHTTPClient) async throws -> Void) async throws {
        let registry = EmbeddedRegistry(logger: Logger(label: "test"))
        let router = Router(context: ControlRequestContext.self)
        let stopping = ShutdownFlag()
        RegistryAPI(registry: registry, stopping: stopping).addRoutes(to: router)
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)))
        try await app.test(.live) { client in
            let port = try #require(client.port)
            var http = RegistryHTTPClient(baseURL: "http://127.0.0.1:\(port)", logger: Logger(label: "test"))
            http.watchWait = .seconds(5)
            defer { stopping.set() }  // open long-polls answer, so the server stops at once
            try await body(registry, http)
        }
    }

    @Test func operationsRoundTrip() async throws {
        try await withClient { registry, client in
            let endpoint = ServiceEndpoint(id: "i-1", address: "10.0.0.7", port: 9090, protocol: "thrift", weight: 40, zone: "z",
                                           metadata: ["version": "3"])
            let lease = try await client.register(service: "billing.charge", endpoint: endpoint, ttlSeconds: 7)
            #expect(lease.service == "billing.charge" && lease.endpointID == "i-1" && lease.ttlSeconds == 7)
            #expect(try await client.resolve("billing.charge") == [endpoint])
            #expect(try await registry.resolve("billing.charge") == [endpoint])
            try await client.heartbeat(lease)
            try await client.setHealth(lease, healthy: false)
            #expect(try await registry.resolve("billing.charge").first?.healthy == false)
            #expect(try await client.services().map(\.name) == ["billing.charge"])
            let listed = try await client.snapshots()
            #expect(listed.first?.endpoints.first?.leaseID == lease.leaseID)
            try await client.deregister(lease)
            #expect(try await client.resolve("billing.charge").isEmpty)
            await #expect(throws: RegistryError.leaseNotFound(lease.leaseID)) { try await client.heartbeat(lease) }
            await #expect(throws: RegistryError.leaseNotFound(lease.leaseID)) { try await client.deregister(lease) }
            do {
                _ = try await client.register(service: "billing.charge", endpoint: ServiceEndpoint(id: "x", address: "h", port: 0, protocol: "http"), ttlSeconds: 5)
                Issue.record("a port of 0 was accepted")
            } catch let RegistryError.invalid(reason) {
                #expect(reason.hasPrefix("endpoint.port:"))
            }
        }
    }

    @Test func watchLongPollsChanges() async throws {
        try await withClient { registry, client in
            var changes = client.watch("billing.refund").makeAsyncIterator()
            #expect(try await changes.next() == [])
            let a = try await registry.register(service: "billing.refund", endpoint: ServiceEndpoint(id: "a", address: "h", port: 1, protocol: "http"), ttlSeconds: 30)
            #expect(try await changes.next()?.map(\.id) == ["a"])
            try await registry.setHealth(a, healthy: false)
            #expect(try await changes.next()?.map(\.healthy) == [false])
            try await registry.deregister(a)
            #expect(try await changes.next() == [])
        }
    }

    @Test func unreachableRegistryIsUnavailable() async throws {
        let client = RegistryHTTPClient(baseURL: "http://127.0.0.1:1", logger: Logger(label: "test"))
        do {
            _ = try await client.resolve("billing.refund")
            Issue.record("resolved against a closed port")
        } catch let error as RegistryError {
            guard case .unavailable = error else { Issue.record("expected unavailable, got \(error)"); return }
        }
    }

    @Test func factoryPicksTheBackend() throws {
        let logger = Logger(label: "test")
        #expect(try makeServiceRegistry(url: "http://127.0.0.1:7070", logger: logger) is RegistryHTTPClient)
        #expect((try makeServiceRegistry(url: "etcd://127.0.0.1:2379", logger: logger) as? EtcdRegistry)?.baseURL == "http://127.0.0.1:2379")
        #expect((try makeServiceRegistry(url: "etcd://etcd.internal", logger: logger) as? EtcdRegistry)?.baseURL == "http://etcd.internal:2379")
        #expect(throws: RegistryError.self) { try makeServiceRegistry(url: "consul://x:1", logger: logger) }
        #expect(throws: RegistryError.self) { try makeServiceRegistry(url: "etcd://host:notaport", logger: logger) }
    }
}
