import ApusCore
import NIOCore
import Testing

@testable import ApusGateway
import ApusWire

@Suite("gateway routing")
struct GatewayRouteTests {
    @Test func pathPrefixRouting() throws {
        #expect(try GatewayRoute.resolve(host: "127.0.0.1:8080", uri: "/orders/items/3?x=1", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/items/3?x=1", routedByPath: true))
        #expect(try GatewayRoute.resolve(host: nil, uri: "/orders", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/", routedByPath: true))
        #expect(try GatewayRoute.resolve(host: nil, uri: "/orders?x=1", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/?x=1", routedByPath: true))
    }

    @Test func hostRouting() throws {
        #expect(try GatewayRoute.resolve(host: "Orders.APUS.localhost:8080", uri: "/a/b", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/a/b", routedByPath: false))
        // Not one label under the domain: falls back to the path.
        #expect(try GatewayRoute.resolve(host: "a.b.apus.localhost", uri: "/f/x", domain: "apus.localhost").function == "f")
        #expect(try GatewayRoute.resolve(host: "apus.localhost", uri: "/f/x", domain: "apus.localhost").function == "f")
        #expect(try GatewayRoute.resolve(host: "xapus.localhost", uri: "/f/x", domain: "apus.localhost").function == "f")
    }

    @Test func badTargets() {
        #expect(throws: ApusError.self) { try GatewayRoute.resolve(host: nil, uri: "/", domain: "d") }
        #expect(throws: ApusError.self) { try GatewayRoute.resolve(host: nil, uri: "*", domain: "d") }
    }
}
