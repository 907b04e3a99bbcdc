import ApusCore
import ApusWire

/// Where a request goes: the function, and the path the instance sees.
struct GatewayRoute: Equatable {
    var function: String
    /// Path (with query) forwarded to the instance.
    var instancePath: String
    /// Routed by the path's first segment (which the instance does not see); false when routed by host.
    var routedByPath: Bool

    /// `/<function>` when routed by path prefix (sent as `X-Forwarded-Prefix`); nil when routed by host.
    var forwardedPrefix: String? { routedByPath ? "/" + function : nil }

    /// Routes by `Host: <function>.<domain>` first, then by the first path segment. Works on UTF-8 bytes: this
    /// runs for every request.
    static func resolve(host: String?, uri: String, domain: String) throws(ApusError) -> GatewayRoute {
        if let host, !domain.isEmpty, let label = hostLabel(host.utf8, domain: domain.utf8) {
            return GatewayRoute(function: label, instancePath: uri.isEmpty ? "/" : uri, routedByPath: false)
        }
        let bytes = uri.utf8
        guard bytes.first == UInt8(ascii: "/") else {
            throw ApusError(.badRequest, "request target must be an absolute path (got \(uri.prefix(64)))")
        }
        let nameStart = bytes.index(after: bytes.startIndex)
        let nameEnd = bytes[nameStart...].firstIndex { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "?") } ?? bytes.endIndex
        guard nameStart < nameEnd else {
            throw ApusError(.notFound, "no function named in the path; call /<function>/... or use Host: <function>.\(domain)")
        }
        let function = String(Substring(uri.utf8[nameStart..<nameEnd]))
        let rest: String
        if nameEnd == bytes.endIndex {
            rest = "/"
        } else if bytes[nameEnd] == UInt8(ascii: "?") {
            rest = "/" + String(Substring(uri.utf8[nameEnd...]))
        } else {
            rest = String(Substring(uri.utf8[nameEnd...]))
        }
        return GatewayRoute(function: function, instancePath: rest, routedByPath: true)
    }

    /// `orders` for `Orders.apus.localhost:8080` with domain `apus.localhost`; nil when the host is not
    /// `<one label>.<domain>`.
    private static func hostLabel(_ host: String.UTF8View, domain: String.UTF8View) -> String? {
        let end = host.firstIndex(of: UInt8(ascii: ":")) ?? host.endIndex
        let hostLength = host.distance(from: host.startIndex, to: end)
        let domainLength = domain.count
        guard hostLength > domainLength + 1 else { return nil }
        let dot = host.index(host.startIndex, offsetBy: hostLength - domainLength - 1)
        guard host[dot] == UInt8(ascii: ".") else { return nil }
        var h = host.index(after: dot)
        for d in domain {
            guard HTTPBytes.lower(host[h]) == HTTPBytes.lower(d) else { return nil }
            h = host.index(after: h)
        }
        let label = host[host.startIndex..<dot]
        guard !label.contains(UInt8(ascii: ".")) else { return nil }
        return String(decoding: label.map(HTTPBytes.lower), as: UTF8.self)
    }
}
