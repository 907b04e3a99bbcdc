import Crypto
import Foundation

/// Control-API token secrets: `apus_` and 43 characters of base64url (32 random bytes). Only their SHA-256 is
/// ever stored; the secret is shown once, when it is made.
public enum TokenSecret {
    public static let prefix = "apus_"
    static let randomBytes = 32

    /// A new secret from the system's cryptographic random source.
    public static func generate() -> String {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<randomBytes).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        return prefix + Base64URL.encode(bytes)
    }

    /// Lower-case hex SHA-256 of the secret's UTF-8 bytes: what the store keeps and lookups use.
    public static func hash(_ secret: String) -> String {
        hex(SHA256.hash(data: Array(secret.utf8)))
    }

    /// A short random identifier: `prefix` and 16 hex digits.
    static func identifier(_ prefix: String) -> String {
        var generator = SystemRandomNumberGenerator()
        return prefix + String(format: "%016llx", generator.next() as UInt64)
    }

    static let hexDigits = Array("0123456789abcdef".utf8)

    /// Lower-case hex, without Foundation's formatting (this runs on every API call).
    static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        var text: [UInt8] = []
        text.reserveCapacity(64)
        for byte in digest {
            text.append(hexDigits[Int(byte >> 4)])
            text.append(hexDigits[Int(byte & 0x0f)])
        }
        return String(decoding: text, as: UTF8.self)
    }


    /// The secret of an `Authorization: Bearer <secret>` value (scheme case-insensitive), or nil.
    public static func bearer(_ authorization: String?) -> String? {
        guard let authorization else { return nil }
        var bytes = Substring(authorization).utf8[...]
        while bytes.first == UInt8(ascii: " ") { bytes = bytes.dropFirst() }
        while bytes.last == UInt8(ascii: " ") { bytes = bytes.dropLast() }
        let scheme = Array("bearer ".utf8)
        guard bytes.count > scheme.count, zip(bytes, scheme).allSatisfy({ $0 | 0x20 == $1 }) else { return nil }
        bytes = bytes.dropFirst(scheme.count)
        while bytes.first == UInt8(ascii: " ") { bytes = bytes.dropFirst() }
        return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
    }

    /// Compares two strings in time that depends on their lengths only.
    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var difference: UInt8 = 0
        for i in 0..<x.count { difference |= x[i] ^ y[i] }
        return difference == 0
    }
}
