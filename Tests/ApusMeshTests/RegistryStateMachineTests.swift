import ApusMesh
import Testing

@Suite("embedded registry state machine")
struct RegistryStateMachineTests {
    let t0 = ContinuousClock.now

    func endpoint(_ id: String, port: Int = 8080, healthy: Bool = true) -> ServiceEndpoint {
        ServiceEndpoint(id: id, address: "127.0.0.1", port: port, protocol: "http", zone: "z1", metadata: ["function": "f"], healthy: healthy)
    }

    @Test func registerResolveAndIndex() throws {
        var machine = RegistryStateMachine(initialIndex: 100, leasePrefix: "t")
        #expect(machine.index(of: "pay.refund") == 0)
        let (lease, change) = try machine.register(service: "pay.refund", endpoint: endpoint("a"), ttlSeconds: 10, now: t0)
        #expect(lease == RegistrationLease(service: "pay.refund", endpointID: "a", leaseID: "t-1", ttlSeconds: 10))
        #expect(change == .registered(service: "pay.refund", endpointID: "a", replaced: false))
        #expect(machine.index(of: "pay.refund") == 101)
        _ = try machine.register(service: "pay.refund", endpoint: endpoint("b", port: 8081), ttlSeconds: 10, now: t0)
        #expect(machine.endpoints(of: "pay.refund").map(\.id) == ["a", "b"])
        #expect(machine.index(of: "pay.refund") == 102)
        #expect(machine.serviceNames == ["pay.refund"])
        let snapshot = machine.snapshot(of: "pay.refund", now: t0.advanced(by: .seconds(4)))
        #expect(snapshot.endpoints.map(\.expiresInSeconds) == [6, 6])
        #expect(snapshot.endpoints.map(\.leaseID) == ["t-1", "t-2"])
    }

    @Test func heartbeatExtendsAndExpiryRemoves() throws {
        var machine = RegistryStateMachine(leasePrefix: "t")
        let (lease, _) = try machine.register(service: "svc", endpoint: endpoint("a"), ttlSeconds: 3, now: t0)
        // At 2 s a heartbeat moves the expiry to 5 s.
        _ = try machine.heartbeat(leaseID: lease.leaseID, now: t0.advanced(by: .seconds(2)))
        #expect(machine.expire(now: t0.advanced(by: .milliseconds(4900))).isEmpty)
        #expect(machine.endpoints(of: "svc").count == 1)
        let indexBefore = machine.index(of: "svc")
        #expect(machine.expire(now: t0.advanced(by: .seconds(5))) == [.expired(service: "svc", endpointID: "a")])
        #expect(machine.endpoints(of: "svc").isEmpty)
        #expect(machine.serviceNames.isEmpty)
        #expect(machine.index(of: "svc") > indexBefore)
        #expect(throws: RegistryError.leaseNotFound(lease.leaseID)) {
            try machine.heartbeat(leaseID: lease.leaseID, now: t0.advanced(by: .seconds(5)))
        }
    }

    @Test func heartbeatAfterTTLFailsEvenBeforeSweep() throws {
        var machine = RegistryStateMachine(leasePrefix: "t")
        let (lease, _) = try machine.register(service: "svc", endpoint: endpoint("a"), ttlSeconds: 1, now: t0)
        #expect(throws: RegistryError.leaseNotFound(lease.leaseID)) {
            try machine.heartbeat(leaseID: lease.leaseID, now: t0.advanced(by: .seconds(2)))
        }
    }

    @Test func deregisterByLeaseAndByName() throws {
        var machine = RegistryStateMachine(leasePrefix: "t")
        let (a, _) = try machine.register(service: "svc", endpoint: endpoint("a"), ttlSeconds: 10, now: t0)
        let (b, _) = try machine.register(service: "svc", endpoint: endpoint("b"), ttlSeconds: 10, now: t0)
        #expect(try machine.deregister(leaseID: a.leaseID) == .deregistered(service: "svc", endpointID: "a"))
        #expect(throws: RegistryError.leaseNotFound(a.leaseID)) { try machine.deregister(leaseID: a.leaseID) }
        // By name, with a lease that is not the current one: refused; without a lease: removed.
        #expect(throws: RegistryError.leaseNotFound("t-99")) { try machine.deregister(service: "svc", endpointID: "b", leaseID: "t-99") }
        #expect(try machine.deregister(service: "svc", endpointID: "b", leaseID: nil) == .deregistered(service: "svc", endpointID: "b"))
        #expect(throws: RegistryError.leaseNotFound(b.leaseID)) { try machine.heartbeat(leaseID: b.leaseID, now: t0) }
        #expect(machine.endpoints(of: "svc").isEmpty)
    }

    @Test func healthFlagChangesIndexOnlyWhenItFlips() throws {
        var machine = RegistryStateMachine(leasePrefix: "t")
        let (lease, _) = try machine.register(service: "svc", endpoint: endpoint("a"), ttlSeconds: 10, now: t0)
        let index = machine.index(of: "svc")
        #expect(try machine.setHealth(leaseID: lease.leaseID, healthy: true, now: t0) == nil)
        #expect(machine.index(of: "svc") == index)
        #expect(try machine.setHealth(leaseID: lease.leaseID, healthy: false, now: t0) == .healthChanged(service: "svc", endpointID: "a", healthy: false))
        #expect(machine.index(of: "svc") == index + 1)
        #expect(machine.endpoints(of: "svc").first?.healthy == false)
        #expect(throws: RegistryError.leaseNotFound("nope")) { try machine.setHealth(leaseID: "nope", healthy: true, now: t0) }
    }

    @Test func reRegisterReplacesEntryAndLease() throws {
        var machine = RegistryStateMachine(leasePrefix: "t")
        let (old, _) = try machine.register(service: "svc", endpoint: endpoint("a", port: 1000), ttlSeconds: 2, now: t0)
        let (new, change) = try machine.register(service: "svc", endpoint: endpoint("a", port: 2000), ttlSeconds: 10, now: t0.advanced(by: .seconds(1)))
        #expect(change == .registered(service: "svc", endpointID: "a", replaced: true))
        #expect(new.leaseID != old.leaseID)
        #expect(machine.endpoints(of: "svc").map(\.port) == [2000])
        #expect(throws: RegistryError.leaseNotFound(old.leaseID)) { try machine.heartbeat(leaseID: old.leaseID, now: t0) }
        // The new TTL counts: still there after the old one's expiry.
        #expect(machine.expire(now: t0.advanced(by: .seconds(5))).isEmpty)
        #expect(machine.nextExpiry == t0.advanced(by: .seconds(11)))
    }

    /// What registering answers: "accepted" or the error's text.
    func outcome(_ machine: inout RegistryStateMachine, _ service: String, _ endpoint: ServiceEndpoint, ttl: Int = 10) -> String {
        switch Result(catching: { () throws(RegistryError) in try machine.register(service: service, endpoint: endpoint, ttlSeconds: ttl, now: t0) }) {
        case .success: "accepted"
        case .failure(let error): error.description
        }
    }

    @Test func invalidRegistrationsNameTheField() {
        var machine = RegistryStateMachine(leasePrefix: "t")
        func failure(_ service: String, _ endpoint: ServiceEndpoint, ttl: Int = 10) -> String {
            outcome(&machine, service, endpoint, ttl: ttl)
        }
        #expect(failure("Bad_Name", endpoint("a")).hasPrefix("service:"))
        #expect(failure("127.0.0.1", endpoint("a")).hasPrefix("service:"))
        #expect(failure("svc", endpoint("a b")).hasPrefix("endpoint.id:"))
        #expect(failure("svc", ServiceEndpoint(id: "a", address: "", port: 1, protocol: "http")).hasPrefix("endpoint.address:"))
        #expect(failure("svc", ServiceEndpoint(id: "a", address: "h", port: 70000, protocol: "http")).hasPrefix("endpoint.port:"))
        #expect(failure("svc", ServiceEndpoint(id: "a", address: "h", port: 1, protocol: "smtp")).hasPrefix("endpoint.protocol:"))
        #expect(failure("svc", ServiceEndpoint(id: "a", address: "h", port: 1, protocol: "http", weight: -1)).hasPrefix("endpoint.weight:"))
        #expect(failure("svc", endpoint("a"), ttl: 0).hasPrefix("ttlSeconds:"))
        #expect(String(repeating: "a", count: 253).count == 253 && RegistryValidation.isServiceName(String(repeating: "a", count: 253)))
        #expect(!RegistryValidation.isServiceName(String(repeating: "a", count: 254)))
        #expect(machine.serviceNames.isEmpty)
    }
}
