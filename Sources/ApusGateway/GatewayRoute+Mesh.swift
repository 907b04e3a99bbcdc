import ApusCore
import ApusScheduler

extension GatewayRoute {
    /// Routes a request whose `Host` (or `:authority`) is a mesh service name (`mesh.service`, port ignored,
    /// case-insensitive) to the function registered under it, path unchanged: this is how a caller that resolved
    /// `payments.refund` from the registry reaches the function through the gateway. Otherwise as
    /// `resolve(host:uri:domain:)`. One atomic load when no function is in the mesh.
    static func resolve(host: String?, uri: String, domain: String, catalog: FunctionCatalog) throws(ApusError) -> GatewayRoute {
        if catalog.anyMeshServices, let host, let name = meshName(host), let function = catalog.function(servingMeshService: name) {
            return GatewayRoute(function: function, instancePath: uri.isEmpty ? "/" : uri, routedByPath: false)
        }
        return try resolve(host: host, uri: uri, domain: domain)
    }

    /// The host without its port, lower-cased; nil for bracketed IPv6 literals and empty hosts.
    static func meshName(_ host: String) -> String? {
        guard let first = host.utf8.first, first != UInt8(ascii: "[") else { return nil }
        let name = host.utf8.firstIndex(of: UInt8(ascii: ":")).map { host[..<$0] } ?? host[...]
        guard !name.isEmpty else { return nil }
        return name.lowercased()
    }
}
