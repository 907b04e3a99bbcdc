import ApusCore
import ApusScheduler
import Foundation
import Testing

@testable import ApusGateway

@Suite("gateway routing by mesh service name")
struct GatewayRouteMeshTests {
    func catalog(mesh: String?) -> FunctionCatalog {
        let catalog = FunctionCatalog()
        var manifest = FunctionManifest(name: "refunds", runtime: .python3, handler: "main.handler")
        manifest.mesh = mesh.map { .init(service: $0) }
        let version = FunctionVersion(function: "refunds", number: 1, codeDigest: "sha256:x", manifest: manifest, createdAt: Date())
        let release = Release(function: "refunds", weights: [.init(version: 1, weight: 100)], updatedAt: Date())
        catalog.update(.init(record: FunctionRecord(name: "refunds", latestVersion: 1, release: release, createdAt: Date(), updatedAt: Date()),
                             versions: [version]))
        return catalog
    }

    @Test func hostNamingTheMeshServiceRoutesWithThePathUnchanged() throws {
        let catalog = catalog(mesh: "payments.refund")
        for host in ["payments.refund", "Payments.Refund:8080"] {
            #expect(try GatewayRoute.resolve(host: host, uri: "/refund/7?x=1", domain: "apus.localhost", catalog: catalog)
                == GatewayRoute(function: "refunds", instancePath: "/refund/7?x=1", routedByPath: false))
        }
        // Other hosts keep the usual routes.
        #expect(try GatewayRoute.resolve(host: "127.0.0.1:8080", uri: "/refunds/a", domain: "apus.localhost", catalog: catalog)
            == GatewayRoute(function: "refunds", instancePath: "/a", routedByPath: true))
        #expect(try GatewayRoute.resolve(host: "refunds.apus.localhost", uri: "/a", domain: "apus.localhost", catalog: catalog)
            == GatewayRoute(function: "refunds", instancePath: "/a", routedByPath: false))
        #expect(try GatewayRoute.resolve(host: "payments.other", uri: "/refunds/a", domain: "apus.localhost", catalog: catalog).function == "refunds")
        #expect(catalog.function(servingMeshService: "payments.refund") == "refunds")
        catalog.remove("refunds")
        #expect(catalog.function(servingMeshService: "payments.refund") == nil)
    }

    @Test func publisherSeesMeshServicesAndGenerations() {
        let catalog = catalog(mesh: "payments.refund")
        let (generation, services) = catalog.meshRegistrations()
        #expect(services.count == 1 && services["payments.refund"]?.function == "refunds" && services["payments.refund"]?.protocol == .http)
        catalog.remove("refunds")
        let (next, none) = catalog.meshRegistrations()
        #expect(next > generation && none.isEmpty)
        #expect(self.catalog(mesh: nil).meshRegistrations().services.isEmpty)
    }
}
