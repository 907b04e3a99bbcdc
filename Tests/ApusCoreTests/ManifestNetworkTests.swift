import ApusCore
import Foundation
import Testing

@Suite("manifest network settings and instance endpoints")
struct ManifestNetworkTests {
    func parse(_ lines: String) throws(ApusError) -> FunctionManifest {
        try FunctionManifest.parse(yaml: "name: f\nruntime: python3\n\(lines)\n")
    }

    func failure(_ lines: String) -> String {
        do {
            _ = try parse(lines)
            return "accepted"
        } catch {
            return error.message
        }
    }

    @Test func egressDefaultsToAll() throws {
        #expect(try parse("").network == nil)
        #expect(try parse("").egress == .all)
        #expect(try parse("network: {}").egress == .all)
        #expect(try parse("network: {egress: none}").egress == FunctionManifest.Egress.none)
        #expect(try parse("network: {egress: all}").egress == .all)
        #expect(try parse("mesh: {service: a.b, sidecar: true}\nnetwork: {egress: mesh}").egress == .mesh)
    }

    @Test func refusesWhatCannotWorkWithTheKeyPath() {
        #expect(failure("network: {egress: outside}") == "apus.yaml: network.egress: must be one of all, mesh, none (got \"outside\")")
        #expect(failure("network: {egress: mesh}").hasPrefix("apus.yaml: network.egress: mesh reaches only the function's sidecar"))
        #expect(failure("mesh: {service: a.b}\nnetwork: {egress: mesh}").hasPrefix("apus.yaml: network.egress: mesh reaches"))
        #expect(failure("network: {ingress: all}").hasPrefix("apus.yaml: network"))
        #expect(failure("network: all").hasPrefix("apus.yaml: network"))
    }

    @Test func storedVersionsKeepTheirEgress() throws {
        let manifest = try parse("network: {egress: none}")
        let decoded = try JSONDecoder().decode(FunctionManifest.self, from: JSONEncoder().encode(manifest))
        #expect(decoded.egress == FunctionManifest.Egress.none)
        // Versions stored before `network:` existed decode with the default.
        var old = try JSONSerialization.jsonObject(with: JSONEncoder().encode(try parse(""))) as! [String: Any]
        old["network"] = nil
        let older = try JSONDecoder().decode(FunctionManifest.self, from: JSONSerialization.data(withJSONObject: old))
        #expect(older.network == nil && older.egress == .all)
    }

    @Test func endpointsFormatAndParseDottedDecimal() {
        let endpoint = InstanceEndpoint(address: 0x0AD5_0016, port: 41001)
        #expect(endpoint.host == "10.213.0.22")
        #expect(endpoint.description == "10.213.0.22:41001")
        #expect(InstanceEndpoint.loopback(port: 80).description == "127.0.0.1:80")
        #expect(InstanceEndpoint.parse("10.213.0.22") == 0x0AD5_0016)
        #expect(InstanceEndpoint.parse("255.255.255.255") == 0xFFFF_FFFF)
        for bad in ["10.213.0", "10.213.0.256", "10.213..1", "a.b.c.d", "1.2.3.4.5", "", "01234.1.1.1", "+1.2.3.4"] {
            #expect(InstanceEndpoint.parse(bad) == nil, "\(bad)")
        }
    }
}
