import ApusCore

/// Where a request goes: the function, and the path the instance sees.
struct GatewayRoute: Equatable {
    var function: String
    /// Path (with query) forwarded to the instance.
    var instancePath: String
    /// `/<function>` when routed by path prefix; nil when routed by host.
    var forwardedPrefix: String?

    /// Routes by `Host: <function>.<domain>` first, then by the first path segment.
    static func resolve(host: String?, uri: String, domain: String) throws(ApusError) -> GatewayRoute {
        if let host, !domain.isEmpty {
            let name = host.split(separator: ":", maxSplits: 1).first.map { $0.lowercased() } ?? ""
            let suffix = "." + domain.lowercased()
            if name.hasSuffix(suffix) {
                let label = String(name.dropLast(suffix.count))
                if !label.isEmpty, !label.contains(".") {
                    return GatewayRoute(function: label, instancePath: uri.isEmpty ? "/" : uri, forwardedPrefix: nil)
                }
            }
        }
        guard uri.hasPrefix("/") else {
            throw ApusError(.badRequest, "request target must be an absolute path (got \(uri.prefix(64)))")
        }
        let afterSlash = uri.dropFirst()
        let end = afterSlash.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? afterSlash.endIndex
        let function = String(afterSlash[..<end])
        guard !function.isEmpty else {
            throw ApusError(.notFound, "no function named in the path; call /<function>/... or use Host: <function>.\(domain)")
        }
        var rest = String(afterSlash[end...])
        if rest.isEmpty || rest.hasPrefix("?") { rest = "/" + rest }
        return GatewayRoute(function: function, instancePath: rest, forwardedPrefix: "/" + function)
    }
}
