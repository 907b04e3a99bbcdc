/// What a control-API token may do. A token holds one or more scopes; `admin` allows every call.
///
/// * `admin`: everything, tokens included;
/// * `deploy`: create, update and delete functions, versions, releases and scale;
/// * `read`: every `GET` (functions, versions, instances, logs, tasks, registry, metrics, info);
/// * `invoke`: submit tasks (the API's one way to invoke a function) and read `/v1/info` (to find the gateway);
///   at the gateway, call every function whose manifest has `auth: {tokens: true}`;
/// * `invoke:<function>`: at the gateway, call that one function (`auth: {tokens: true}`); nothing on the API;
/// * `tasks`: submit, read and cancel tasks;
/// * `secrets`: set and delete stored secrets and list their names and keys (no scope reads a value back);
/// * `registry:<service>`: register, heartbeat and deregister endpoints of that one mesh service, and resolve
///   services (what a sidecar needs).
public enum APIScope: Hashable, Sendable, CustomStringConvertible {
    case admin
    case deploy
    case read
    case invoke
    case tasks
    case secrets
    case registry(service: String)
    case invokeFunction(String)

    /// The scopes without a parameter, by name.
    public static let plain: [APIScope] = [.admin, .deploy, .read, .invoke, .tasks, .secrets]

    /// `admin`, `deploy`, `read`, `invoke`, `tasks`, `secrets` or `registry:<service>` (a valid mesh service name).
    public init?(_ text: String) {
        if let plain = Self.plain.first(where: { $0.description == text }) {
            self = plain
            return
        }
        let invokePrefix = "invoke:"
        if text.hasPrefix(invokePrefix) {
            let function = String(text.dropFirst(invokePrefix.count))
            guard FunctionManifest.isFunctionName(function) else { return nil }
            self = .invokeFunction(function)
            return
        }
        let prefix = "registry:"
        guard text.hasPrefix(prefix) else { return nil }
        let service = String(text.dropFirst(prefix.count))
        guard Self.isServiceName(service) else { return nil }
        self = .registry(service: service)
    }

    /// Parses a scope, or says what is accepted.
    public static func parse(_ text: String) throws(ApusError) -> APIScope {
        guard let scope = APIScope(text) else {
            throw ApusError(.badRequest, "scope \"\(text.prefix(100))\": must be admin, deploy, read, invoke, invoke:<function>, tasks, secrets or registry:<service> (a mesh service name such as registry:payments.refund)")
        }
        return scope
    }

    public var description: String {
        switch self {
        case .admin: "admin"
        case .deploy: "deploy"
        case .read: "read"
        case .invoke: "invoke"
        case .tasks: "tasks"
        case .secrets: "secrets"
        case .registry(let service): "registry:\(service)"
        case .invokeFunction(let function): "invoke:\(function)"
        }
    }

    /// Whether these scopes let a caller invoke `function` at the gateway: `invoke:<function>`, `invoke` or `admin`.
    public static func allowInvoking(_ function: String, scopes: [APIScope]) -> Bool {
        scopes.contains { $0 == .admin || $0 == .invoke || $0 == .invokeFunction(function) }
    }

    /// The service a `registry:<service>` scope names.
    public var registryService: String? {
        if case .registry(let service) = self { return service }
        return nil
    }

    /// A mesh service name as the registry takes it: 1-253 characters of a-z, 0-9, '.', '-', '_'.
    static func isServiceName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 253
            && name.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2e || $0 == 0x2d || $0 == 0x5f }
    }
}

extension APIScope: Codable {
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let scope = APIScope(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "unknown scope \(text)"))
        }
        self = scope
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// What one control-API route asks of its caller.
public enum APIAccess: Sendable, Hashable, CustomStringConvertible {
    /// Anyone, with or without a token (health).
    case open
    /// A token holding any of these scopes (or `admin`).
    case anyOf([APIScope])
    /// A token holding `registry:<service>` for the service the path names (or `admin`).
    case registryService
    /// A token holding `read` or any `registry:<service>` scope (or `admin`): resolving services.
    case registryRead
    /// A token holding any `registry:<service>` scope (or `admin`): calls on a lease, whose owner the registry
    /// API checks.
    case registryLease
    /// Only `admin`.
    case admin

    /// Whether `scopes` satisfy this access; `service` is the service the path names, for `.registryService`.
    public func allows(_ scopes: [APIScope], service: String? = nil) -> Bool {
        if scopes.contains(.admin) { return true }
        switch self {
        case .open: return true
        case .admin: return false
        case .anyOf(let wanted): return scopes.contains { wanted.contains($0) }
        case .registryService:
            guard let service else { return false }
            return scopes.contains(.registry(service: service))
        case .registryRead:
            return scopes.contains { $0 == .read || $0.registryService != nil }
        case .registryLease:
            return scopes.contains { $0.registryService != nil }
        }
    }

    /// The scope(s) a caller needs, as the 403 message names them.
    public func needed(service: String? = nil) -> String {
        switch self {
        case .open: "none"
        case .admin: "admin"
        case .anyOf(let wanted): wanted.count == 1 ? "\(wanted[0])" : "one of \(wanted.map(\.description).joined(separator: ", "))"
        case .registryService: "registry:\(service ?? "<service>")"
        case .registryRead: "read or registry:<service>"
        case .registryLease: "registry:<service> (of the token that registered the endpoint)"
        }
    }

    public var description: String { needed() }
}
