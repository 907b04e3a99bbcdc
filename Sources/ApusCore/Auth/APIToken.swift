import Foundation

/// A control-API bearer token as the store keeps it: never the secret, only its SHA-256 (hex).
public struct APIToken: Codable, Sendable, Hashable {
    /// Stable identity (`tok-` and 16 hex digits): what registry endpoints record as their owner, so that a token
    /// revoked and created again under the same name owns nothing of the old one's.
    public var id: String
    /// Unique among stored tokens: what `apus token revoke` and the audit log name.
    public var name: String
    /// Lower-case hex SHA-256 of the whole secret (`apus_…`).
    public var hash: String
    public var scopes: [APIScope]
    public var createdAt: Date
    /// After this the token is refused (401 "expired"); nil: never.
    public var expiresAt: Date?

    public init(id: String, name: String, hash: String, scopes: [APIScope], createdAt: Date, expiresAt: Date? = nil) {
        self.id = id
        self.name = name
        self.hash = hash
        self.scopes = scopes
        self.createdAt = createdAt
        self.expiresAt = expiresAt
    }

    public func isExpired(at now: Date) -> Bool {
        expiresAt.map { $0 <= now } ?? false
    }

    /// 1-64 characters of a-z, 0-9, '.', '-', '_', starting with a letter or digit.
    public static func validateName(_ name: String) throws(ApusError) {
        let bytes = Array(name.utf8)
        func allowed(_ b: UInt8) -> Bool { (b >= 0x61 && b <= 0x7a) || (b >= 0x30 && b <= 0x39) || b == 0x2e || b == 0x2d || b == 0x5f }
        guard (1...64).contains(bytes.count), bytes.allSatisfy(allowed), bytes[0] != 0x2e, bytes[0] != 0x2d, bytes[0] != 0x5f else {
            throw ApusError(.badRequest, "name \"\(name.prefix(80))\": must be 1-64 characters of a-z, 0-9, '.', '-', '_', starting with a letter or digit")
        }
    }
}
