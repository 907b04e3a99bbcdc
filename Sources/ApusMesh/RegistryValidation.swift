/// The rules every registry applies before it stores anything, so a bad registration fails the same way on every
/// backend: `RegistryError.invalid` naming the field (`service`, `endpoint.port`, `ttlSeconds`, …).
public enum RegistryValidation {
    public static let protocols: Set<String> = ["http", "grpc", "thrift"]
    public static let ttlRange = 1...3600
    public static let weightRange = 0...10_000

    /// A mesh service name: DNS-like, `[a-z0-9]([a-z0-9.-]*[a-z0-9])?`, at most 253 characters, with at least one
    /// letter (so it never reads as an IP address). The same rule as `mesh.service` in `apus.yaml`.
    public static func isServiceName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...253).contains(bytes.count) else { return false }
        func alnum(_ b: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b)
        }
        guard alnum(bytes[0]), alnum(bytes[bytes.count - 1]) else { return false }
        guard bytes.allSatisfy({ alnum($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }) else { return false }
        return bytes.contains { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) }
    }

    /// An endpoint id: 1-253 characters of letters, digits and `.-_:@`.
    public static func isEndpointID(_ id: String) -> Bool {
        let bytes = Array(id.utf8)
        guard (1...253).contains(bytes.count) else { return false }
        return bytes.allSatisfy { b in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || ".-_:@".utf8.contains(b)
        }
    }

    public static func validateService(_ service: String) throws(RegistryError) {
        guard isServiceName(service) else {
            throw .invalid("service: must be 1-253 characters of a-z, 0-9, '.' and '-', start and end with a letter or digit and contain a letter (got \"\(service.prefix(80))\")")
        }
    }

    public static func validate(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int) throws(RegistryError) {
        try validateService(service)
        guard isEndpointID(endpoint.id) else {
            throw .invalid("endpoint.id: must be 1-253 characters of letters, digits and .-_:@ (got \"\(endpoint.id.prefix(80))\")")
        }
        let address = endpoint.address
        guard !address.isEmpty, address.utf8.count <= 253, !address.contains(where: { $0 == " " || $0 == "/" || $0.isNewline }) else {
            throw .invalid("endpoint.address: must be a host name or IP address (got \"\(address.prefix(80))\")")
        }
        guard (1...65535).contains(endpoint.port) else {
            throw .invalid("endpoint.port: must be 1...65535 (got \(endpoint.port))")
        }
        guard protocols.contains(endpoint.protocol) else {
            throw .invalid("endpoint.protocol: must be one of grpc, http, thrift (got \"\(endpoint.protocol.prefix(40))\")")
        }
        guard weightRange.contains(endpoint.weight) else {
            throw .invalid("endpoint.weight: must be \(weightRange.lowerBound)...\(weightRange.upperBound) (got \(endpoint.weight))")
        }
        if let zone = endpoint.zone, zone.isEmpty || zone.utf8.count > 63 {
            throw .invalid("endpoint.zone: must be 1-63 characters when given")
        }
        guard endpoint.metadata.count <= 64 else {
            throw .invalid("endpoint.metadata: at most 64 entries (got \(endpoint.metadata.count))")
        }
        for (key, value) in endpoint.metadata where key.isEmpty || key.utf8.count > 128 || value.utf8.count > 1024 {
            throw .invalid("endpoint.metadata.\(key.prefix(40)): keys must be 1-128 bytes and values at most 1024 bytes")
        }
        guard ttlRange.contains(ttlSeconds) else {
            throw .invalid("ttlSeconds: must be \(ttlRange.lowerBound)...\(ttlRange.upperBound) (got \(ttlSeconds))")
        }
    }
}
