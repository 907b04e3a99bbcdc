import ApusCore
import Testing

@Suite("manifest mesh settings")
struct ManifestMeshTests {
    func parse(_ mesh: String) throws(ApusError) -> FunctionManifest {
        try FunctionManifest.parse(yaml: "name: f\nruntime: python3\n\(mesh)\n")
    }

    func failure(_ mesh: String) -> String {
        do {
            _ = try parse(mesh)
            return "accepted"
        } catch {
            return error.message
        }
    }

    @Test func parsesServiceAndSidecar() throws {
        #expect(try parse("mesh: {service: payments.refund, sidecar: true}").mesh == .init(service: "payments.refund", sidecar: true))
        #expect(try parse("mesh: {service: a-1.b}").mesh == .init(service: "a-1.b", sidecar: false))
        #expect(try parse("").mesh == nil)
    }

    @Test func rejectsBadValuesWithTheKeyPath() {
        #expect(failure("mesh: {service: Payments}").hasPrefix("apus.yaml: mesh.service: must be"))
        #expect(failure("mesh: {service: -x}").hasPrefix("apus.yaml: mesh.service:"))
        #expect(failure("mesh: {service: 10.0.0.1}").hasPrefix("apus.yaml: mesh.service:"))
        #expect(failure("mesh: {service: \(String(repeating: "a", count: 254))}").hasPrefix("apus.yaml: mesh.service:"))
        #expect(failure("mesh: {sidecar: true}") == "apus.yaml: mesh.service: is required")
        #expect(failure("mesh: {service: x, sidecar: maybe}") == "apus.yaml: mesh.sidecar: must be true or false (got \"maybe\")")
        #expect(failure("mesh: {service: x, port: 3}").hasPrefix("apus.yaml: mesh.port: unknown key"))
        #expect(failure("mesh: payments").hasPrefix("apus.yaml: mesh: must be a mapping"))
    }

    @Test func roundTripsThroughJSON() throws {
        let manifest = try parse("mesh: {service: payments.refund, sidecar: true}")
        let data = try JSONEncoder().encode(manifest)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == manifest)
    }
}

import Foundation
