#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import Foundation

/// Where task callbacks may go. A callback URL comes from whoever submitted the task (anyone who can call the
/// gateway), so by default it may not point at the node itself: loopback, link-local (cloud metadata services
/// live there), unspecified and multicast addresses, and every address of this node's interfaces are refused.
/// `apusd --callback-allow HOST|CIDR` (repeatable) admits hosts or networks, the refused ones included.
/// Checked at submission for addresses written in the URL, and again before every delivery for what a host name
/// resolves to then. Redirects are never followed (`CallbackSender`).
public struct CallbackPolicy: Sendable {
    /// An allow-list entry: a host name (exact, case-insensitive) or a network.
    public enum Rule: Sendable, Equatable {
        case host(String)
        case network(IPNetwork)
    }

    public let allowed: [Rule]
    /// Networks refused unless allowed: the fixed ranges and the node's own addresses.
    let refused: [IPNetwork]

    public init(allowed: [Rule] = [], ownAddresses: [IPNetwork] = CallbackPolicy.interfaceAddresses()) {
        self.allowed = allowed
        self.refused = Self.alwaysRefused + ownAddresses
    }

    static let alwaysRefused: [IPNetwork] = [
        "127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
        "::1/128", "::/128", "fe80::/10", "ff00::/8", "::ffff:127.0.0.0/104", "::ffff:169.254.0.0/112",
    ].map { IPNetwork(parsing: $0)! }

    /// Parses `--callback-allow` values: a CIDR (`10.1.0.0/16`, `fd00::/8`), an address, or a host name.
    public static func parse(_ entries: [String]) -> Result<CallbackPolicy, ApusError> {
        var rules: [Rule] = []
        for entry in entries {
            if let network = IPNetwork(parsing: entry) {
                rules.append(.network(network))
            } else if !entry.contains("/"), !entry.isEmpty, entry.count <= 253,
                      entry.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" }) {
                rules.append(.host(entry.lowercased()))
            } else {
                return .failure(ApusError(.badRequest, "--callback-allow: \(entry) is neither a host name nor an address or CIDR such as 10.0.0.0/8"))
            }
        }
        return .success(CallbackPolicy(allowed: rules))
    }

    /// Why `url` may not be called back now, or nil. Resolves a host name (blocking: call off event loops) when
    /// `resolve` is true; otherwise only addresses written in the URL and `localhost` are judged.
    public func refusal(for url: String, resolve: Bool) -> String? {
        guard let components = URLComponents(string: url), let rawHost = components.host, !rawHost.isEmpty else {
            return "callback URL has no host"
        }
        let host = rawHost.trimmingCharacters(in: CharacterSet(charactersIn: "[]")).lowercased()
        if allowed.contains(.host(host)) { return nil }
        var addresses: [IPAddress] = []
        if let literal = IPAddress(parsing: host) {
            addresses = [literal]
        } else if host == "localhost" || host.hasSuffix(".localhost") {
            return "callback host \(host) is this node (loopback); apusd --callback-allow admits it"
        } else if resolve {
            addresses = Self.resolve(host)
            if addresses.isEmpty { return "callback host \(host) does not resolve" }
        } else {
            return nil
        }
        for address in addresses {
            if allowed.contains(where: { if case .network(let n) = $0 { n.contains(address) } else { false } }) { continue }
            if let network = refused.first(where: { $0.contains(address) }) {
                return "callback host \(host) is \(address) (in \(network), loopback, link-local or this node's own); apusd --callback-allow admits it"
            }
        }
        return nil
    }

    static func resolve(_ host: String) -> [IPAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &result) == 0, let first = result else { return [] }
        defer { freeaddrinfo(first) }
        var addresses: [IPAddress] = []
        var next: UnsafeMutablePointer<addrinfo>? = first
        while let info = next {
            if let address = IPAddress(sockaddr: info.pointee.ai_addr) { addresses.append(address) }
            next = info.pointee.ai_next
        }
        return addresses
    }

    /// Every address of this node's interfaces, each as a single-address network.
    public static func interfaceAddresses() -> [IPNetwork] {
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(first) }
        var networks: [IPNetwork] = []
        var next: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = next {
            if let address = entry.pointee.ifa_addr.flatMap({ IPAddress(sockaddr: $0) }) {
                networks.append(IPNetwork(address: address, prefix: address.bytes.count * 8))
            }
            next = entry.pointee.ifa_next
        }
        return networks
    }
}

/// An IPv4 or IPv6 address as its bytes (4 or 16).
public struct IPAddress: Sendable, Equatable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(parsing text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }

    init?(sockaddr pointer: UnsafePointer<sockaddr>) {
        switch Int32(pointer.pointee.sa_family) {
        case AF_INET:
            bytes = pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { withUnsafeBytes(of: $0.pointee.sin_addr) { Array($0) } }
        case AF_INET6:
            bytes = pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { withUnsafeBytes(of: $0.pointee.sin6_addr) { Array($0) } }
        default:
            return nil
        }
    }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        var copy = bytes
        let family = bytes.count == 4 ? AF_INET : AF_INET6
        _ = inet_ntop(family, &copy, &buffer, socklen_t(buffer.count))
        return String(cString: buffer)
    }
}

/// An address and a prefix length: `10.0.0.0/8`, `fe80::/10`.
public struct IPNetwork: Sendable, Equatable, CustomStringConvertible {
    public let address: IPAddress
    public let prefix: Int

    public init(address: IPAddress, prefix: Int) {
        self.address = address
        self.prefix = prefix
    }

    /// `ADDRESS/PREFIX` or a bare address (all its bits).
    public init?(parsing text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(parsing: String(parts[0])) else { return nil }
        let bits = address.bytes.count * 8
        if parts.count == 2 {
            guard let prefix = Int(parts[1]), (0...bits).contains(prefix) else { return nil }
            self.init(address: address, prefix: prefix)
        } else {
            self.init(address: address, prefix: bits)
        }
    }

    public func contains(_ other: IPAddress) -> Bool {
        guard other.bytes.count == address.bytes.count else { return false }
        var left = prefix
        for (a, b) in zip(address.bytes, other.bytes) {
            guard left > 0 else { return true }
            let mask: UInt8 = left >= 8 ? 0xFF : ~(0xFF >> UInt8(left))
            if a & mask != b & mask { return false }
            left -= 8
        }
        return true
    }

    public var description: String { "\(address)/\(prefix)" }
}
