#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore
import Foundation
import HTTPTypes

/// Which scope each control route needs, and the request checks that stop cross-site requests and DNS rebinding:
/// the table behind `ControlGate`.
public struct APIPolicy: Sendable {
    /// Host names (besides loopback names and IP literals) mutating calls may name in `Host`: the API's own
    /// `--api-host` and every `--api-allowed-host`.
    public var allowedHosts: Set<String>
    /// `GET /metrics` without a token (`apusd --api-open-metrics`).
    public var openMetrics: Bool

    public init(allowedHosts: [String] = [], openMetrics: Bool = false) {
        self.allowedHosts = Set(allowedHosts.map { $0.lowercased() })
        self.openMetrics = openMetrics
    }

    /// What kind of body a route takes, for the media-type check of mutating calls.
    public enum BodyKind: Sendable {
        /// JSON or nothing: another `Content-Type` is refused (415).
        case json
        /// Whatever the route takes (a code archive): only the types an HTML form can send are refused.
        case upload
        /// Opaque bytes handed on as they are (a task payload): any type.
        case opaque
    }

    public struct Rule: Sendable {
        public var access: APIAccess
        public var body: BodyKind

        public init(_ access: APIAccess, body: BodyKind = .json) {
            self.access = access
            self.body = body
        }
    }

    /// Every route of the control API by method and Hummingbird route path. A route missing here needs `admin`
    /// (fail closed); `ControlAPITests` checks that every route the router serves is listed.
    public static let rules: [String: Rule] = [
        "GET /healthz": Rule(.open),
        "GET /v1/info": Rule(.anyOf([.read, .invoke])),
        "GET /metrics": Rule(.anyOf([.read])),

        "POST /v1/functions": Rule(.anyOf([.deploy]), body: .upload),
        "GET /v1/functions": Rule(.anyOf([.read])),
        "GET /v1/functions/{name}": Rule(.anyOf([.read])),
        "DELETE /v1/functions/{name}": Rule(.anyOf([.deploy])),
        "GET /v1/functions/{name}/versions": Rule(.anyOf([.read])),
        "GET /v1/functions/{name}/versions/{number}": Rule(.anyOf([.read])),
        "PUT /v1/functions/{name}/release": Rule(.anyOf([.deploy])),
        "GET /v1/functions/{name}/instances": Rule(.anyOf([.read])),
        "PUT /v1/functions/{name}/scale": Rule(.anyOf([.deploy])),
        "DELETE /v1/functions/{name}/scale": Rule(.anyOf([.deploy])),
        "GET /v1/functions/{name}/logs": Rule(.anyOf([.read])),

        "POST /v1/functions/{name}/tasks": Rule(.anyOf([.tasks, .invoke]), body: .opaque),
        "POST /v1/tasks": Rule(.anyOf([.tasks, .invoke])),
        "GET /v1/tasks": Rule(.anyOf([.tasks, .read])),
        "GET /v1/tasks/dead-letter": Rule(.anyOf([.tasks, .read])),
        "GET /v1/tasks/counts": Rule(.anyOf([.tasks, .read])),
        "GET /v1/tasks/{id}": Rule(.anyOf([.tasks, .read])),
        "DELETE /v1/tasks/{id}": Rule(.anyOf([.tasks])),
        // Or the task's progress capability (?capability=…), which is all a function gets.
        "POST /v1/tasks/{id}/progress": Rule(.anyOf([.tasks])),

        "GET /v1/registry/services": Rule(.registryRead),
        "GET /v1/registry/services/{service}": Rule(.registryRead),
        "PUT /v1/registry/services/{service}/endpoints/{id}": Rule(.registryService),
        "DELETE /v1/registry/services/{service}/endpoints/{id}": Rule(.registryService),
        // The lease's owner (or admin) only; RegistryAPI checks ownership.
        "POST /v1/registry/leases/{lease}/heartbeat": Rule(.registryLease),
        "PUT /v1/registry/leases/{lease}/health": Rule(.registryLease),

        "GET /v1/tokens": Rule(.admin),
        "POST /v1/tokens": Rule(.admin),
        "DELETE /v1/tokens/{name}": Rule(.admin),

        // Names, keys and times only: no route returns a value.
        "GET /v1/secrets": Rule(.anyOf([.read, .secrets])),
        "PUT /v1/secrets/{name}/keys/{key}": Rule(.anyOf([.secrets])),
        "DELETE /v1/secrets/{name}": Rule(.anyOf([.secrets])),
        "DELETE /v1/secrets/{name}/keys/{key}": Rule(.anyOf([.secrets])),
    ]

    public func rule(method: HTTPRequest.Method, route: String) -> Rule {
        if openMetrics, method == .get, route == "/metrics" { return Rule(.open) }
        return Self.rules["\(method.rawValue) \(route)"] ?? Rule(.admin)
    }

    public static func isMutating(_ method: HTTPRequest.Method) -> Bool {
        ![.get, .head, .options].contains(method)
    }

    // MARK: request checks of mutating calls

    /// The host part of a `Host` header or URL authority, lower-cased, without port or IPv6 brackets.
    static func hostName(_ authority: String) -> String {
        var text = authority.lowercased()
        if text.hasPrefix("[") {
            if let end = text.firstIndex(of: "]") { return String(text[text.index(after: text.startIndex)..<end]) }
            return text
        }
        if let colon = text.lastIndex(of: ":"), text.firstIndex(of: ":") == colon { text = String(text[..<colon]) }
        if text.hasSuffix(".") { text.removeLast() }
        return text
    }

    static func isIPLiteral(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }

    /// A `Host` the API answers to: an IP literal (a rebinding attack needs a name), `localhost` or a name under
    /// it, or a configured name. Refused with the reason otherwise.
    public func checkHost(_ header: String?) throws(ApusError) {
        guard let header, !header.isEmpty else {
            throw ApusError(.forbidden, "a request that changes state needs a Host header naming the API")
        }
        let host = Self.hostName(header)
        if Self.isIPLiteral(host) || host == "localhost" || host.hasSuffix(".localhost") || allowedHosts.contains(host) { return }
        throw ApusError(.forbidden, "Host \(header.prefix(100)) is not a name of this API (loopback names, IP addresses, --api-host and --api-allowed-host are); refused so that a DNS-rebinding page cannot reach it")
    }

    /// No `Origin`, or the API's own: `scheme://` and the request's `Host`.
    public func checkOrigin(_ origin: String?, host: String?) throws(ApusError) {
        guard let origin else { return }
        let lowered = origin.lowercased()
        let authority: String
        if lowered.hasPrefix("http://") {
            authority = String(lowered.dropFirst(7))
        } else if lowered.hasPrefix("https://") {
            authority = String(lowered.dropFirst(8))
        } else {
            throw ApusError(.forbidden, "Origin \(origin.prefix(100)) is not this API's own; cross-site requests are refused")
        }
        guard let host, authority.trimmingCharacters(in: CharacterSet(charactersIn: "/")) == host.lowercased() else {
            throw ApusError(.forbidden, "Origin \(origin.prefix(100)) is not this API's own (\(host.map { "http://\($0)" } ?? "no Host")); cross-site requests are refused")
        }
    }

    /// The media types an HTML form (or a no-CORS fetch) can send without a preflight.
    static let formTypes = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]

    public func checkContentType(_ header: String?, body: BodyKind) throws(ApusError) {
        guard let header else { return }
        let type = header.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
        switch body {
        case .opaque:
            return
        case .upload:
            if Self.formTypes.contains(type) {
                throw ApusError(.unsupportedMediaType, "Content-Type \(type) is not taken here: upload a gzip-compressed tar archive (application/gzip)")
            }
        case .json:
            if type.isEmpty || type == "application/json" || (type.hasPrefix("application/") && type.hasSuffix("+json")) { return }
            throw ApusError(.unsupportedMediaType, "Content-Type \(type) is not taken here: the body must be JSON (Content-Type: application/json)")
        }
    }
}
