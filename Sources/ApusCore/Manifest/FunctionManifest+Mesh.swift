extension FunctionManifest {
    /// `mesh: {service: payments.refund, sidecar: true}`: the function is registered in service discovery under
    /// `service` (with the gateway's endpoint for its protocol), and with `sidecar: true` each instance gets an
    /// `apus-sidecar` beside it (`APUS_SIDECAR`) for its own calls to other services.
    public struct MeshSettings: Codable, Hashable, Sendable {
        /// The mesh service name callers resolve: DNS-like, `[a-z0-9]([a-z0-9.-]*[a-z0-9])?`, ≤ 253 characters.
        public var service: String
        public var sidecar: Bool

        public init(service: String, sidecar: Bool = false) {
            self.service = service
            self.sidecar = sidecar
        }
    }

    /// A mesh service name: 1-253 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit,
    /// with at least one letter (never an IP address, which the gateway's host routing must not capture). The same
    /// rule as `RegistryValidation.isServiceName` in ApusMesh.
    public static func isMeshServiceName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...253).contains(bytes.count) else { return false }
        func alnum(_ b: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b)
        }
        guard alnum(bytes[0]), alnum(bytes[bytes.count - 1]),
              bytes.allSatisfy({ alnum($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }) else { return false }
        return bytes.contains { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) }
    }

    static func parseMesh(_ reader: ManifestReader) throws(ApusError) -> MeshSettings? {
        guard let mapping = try reader.optionalMapping("mesh") else { return nil }
        let mesh = ManifestReader(mapping: mapping, path: "mesh")
        try mesh.rejectUnknownKeys(allowed: ["service", "sidecar"])
        let service = try mesh.requiredString("service")
        guard isMeshServiceName(service) else {
            throw ManifestReader.failure("mesh.service", "must be 1-253 characters of a-z, 0-9, '.' and '-', start and end with a letter or digit and contain a letter, e.g. payments.refund (got \"\(service.prefix(80))\")")
        }
        let sidecar = try mesh.optionalBool("sidecar") ?? false
        return MeshSettings(service: service, sidecar: sidecar)
    }
}
