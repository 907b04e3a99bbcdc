import Foundation
import Logging

/// The registry a `--registry URL` names:
///
/// * `http://host:port` (or `https://`) — an apusd's control API, whose embedded registry is served under
///   `/v1/registry/…` (`RegistryHTTPClient`);
/// * `etcd://host:port` — an etcd v3 cluster member's client URL, spoken to over its JSON gateway in plain HTTP
///   (`EtcdRegistry`; `etcd+https://host:port` for TLS).
///
/// Anything else throws `RegistryError.invalid` saying what is accepted.
public func makeServiceRegistry(url: String, token: String? = nil, logger: Logger) throws -> any ServiceRegistry {
    try makeSnapshottingServiceRegistry(url: url, token: token, logger: logger)
}

/// `makeServiceRegistry`, typed with the snapshot and long-poll operations (what apusd and `apus` use). `token` is
/// the control-API bearer token an apusd registry is called with (ignored for etcd).
public func makeSnapshottingServiceRegistry(url: String, token: String? = nil, logger: Logger) throws(RegistryError) -> any SnapshottingServiceRegistry {
    let trimmed = url.trimmingCharacters(in: .whitespaces)
    func hostPort(after scheme: String) throws(RegistryError) -> String {
        var rest = String(trimmed.dropFirst(scheme.count))
        while rest.hasSuffix("/") { rest.removeLast() }
        let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
        guard !rest.isEmpty, !rest.contains("/"), parts.count <= 2, !parts[0].isEmpty,
              parts.count == 1 || (Int(parts[1]).map { (1...65535).contains($0) } ?? false) else {
            throw .invalid("registry URL: expected \(scheme)host:port (got \"\(url)\")")
        }
        return rest
    }
    if trimmed.hasPrefix("etcd://") {
        let authority = try hostPort(after: "etcd://")
        return EtcdRegistry(baseURL: "http://" + (authority.contains(":") ? authority : authority + ":2379"), logger: logger)
    }
    if trimmed.hasPrefix("etcd+https://") {
        let authority = try hostPort(after: "etcd+https://")
        return EtcdRegistry(baseURL: "https://" + (authority.contains(":") ? authority : authority + ":2379"), logger: logger)
    }
    if trimmed.hasPrefix("http://") || trimmed.hasPrefix("https://") {
        let scheme = trimmed.hasPrefix("http://") ? "http://" : "https://"
        return RegistryHTTPClient(baseURL: scheme + (try hostPort(after: scheme)), token: token, logger: logger)
    }
    throw .invalid("registry URL: must be http://host:port (an apusd API) or etcd://host:port (got \"\(url)\")")
}
