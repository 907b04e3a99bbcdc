import ApusMesh
import Logging
import NIOCore
import NIOPosix
import Testing
@testable import ApusSidecarCore

/// The sidecar's registration against an in-memory registry, with a real listener standing in for the app.
@Suite("registration")
struct RegistrationTests {
    /// Polls `condition` every 50 ms for up to `seconds`.
    func eventually(_ seconds: Double, _ condition: () async throws -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(50))
        }
        return try await condition()
    }

    @Test("registers, re-registers after the lease is lost, reports health, deregisters on shutdown")
    func lifecycle() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let app = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let registry = StaticRegistry()
        var config = SidecarConfig()
        config.inboundPort = 0
        config.appPort = app.localAddress!.port!
        config.service = "orders"
        config.instanceID = "orders-1"
        config.registrationTTLSeconds = 1
        config.inbound.healthCheck.interval = .milliseconds(100)
        config.inbound.healthCheck.unhealthyAfter = 1
        let sidecar = Sidecar(config: config, registry: registry, group: group, metrics: nil, logger: Logger(label: "test"))
        let ports = try await sidecar.start()

        // Registered, and healthy once the first probe of the app passed.
        #expect(try await eventually(3) { try await registry.resolve("orders").map(\.id) == ["orders-1"] })
        #expect(try await eventually(3) { try await registry.resolve("orders").first?.healthy == true })
        let endpoint = try await registry.resolve("orders")[0]
        #expect(endpoint.port == ports.inbound)

        // The lease disappears behind the sidecar's back (expired, registry restarted): it registers again.
        let lease = RegistrationLease(service: "orders", endpointID: "orders-1", leaseID: "static-1", ttlSeconds: 1)
        try await registry.deregister(lease)
        #expect(try await registry.resolve("orders").isEmpty)
        #expect(try await eventually(3) { try await registry.resolve("orders").first?.healthy == true })

        // Heartbeats keep it past its TTL.
        try await Task.sleep(for: .milliseconds(1500))
        #expect(try await registry.resolve("orders").count == 1)

        // The app stops listening: the health check reports it unhealthy.
        try await app.close()
        #expect(try await eventually(3) { try await registry.resolve("orders").first?.healthy == false })
        #expect(!sidecar.appHealthy)

        await sidecar.shutdown()
        #expect(try await registry.resolve("orders").isEmpty)
        try await group.shutdownGracefully()
    }
}
