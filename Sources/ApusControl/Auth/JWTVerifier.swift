import ApusCore
import Crypto
import CryptoExtras
import Foundation
import JWTKit
import Synchronization

/// Verifies the JSON Web Tokens a function's `auth.jwt` accepts, synchronously (it runs on the gateway's event
/// loops): jwt-kit parses the token, its header and claims and the JWKS; the signature is checked with swift-crypto
/// against keys built once, when the function's policy is compiled.
///
/// What is refused: `alg: none` and any algorithm the key it names was not made for (an RSA or EC key never
/// verifies an HMAC token: the algorithm comes from the key, not from the token); a `kid` no key has; a token
/// without `exp`, expired, or not yet valid (`nbf`), each with `leeway`; an `iss` other than the issuer; an `aud`
/// naming none of the audiences (when some are configured).
public struct JWTVerifier: Sendable {
    /// One key and the algorithms it verifies.
    struct Key: Sendable {
        var id: String?
        var algorithms: Set<String>
        var material: Material
    }

    enum Material: Sendable {
        case rsa(_RSA.Signing.PublicKey)
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
        case p521(P521.Signing.PublicKey)
        case ed25519(Curve25519.Signing.PublicKey)
        case hmac(SymmetricKey)
    }

    /// The claims the gateway checks; others in the token are ignored.
    struct Claims: JWTPayload {
        var exp: ExpirationClaim?
        var nbf: NotBeforeClaim?
        var iss: IssuerClaim?
        var aud: AudienceClaim?
        var sub: SubjectClaim?

        /// jwt-kit's own verification hook (the gateway checks claims itself, synchronously, in `verify`).
        func verify(using algorithm: some JWTAlgorithm) async throws {
            guard let exp else { throw JWTError.claimVerificationFailure(failedClaim: nil, reason: "no exp claim") }
            try exp.verifyNotExpired()
        }
    }

    let keys: [Key]
    let settings: FunctionManifest.JWTSettings
    /// Tokens that verified, with the times they are valid between: a client sends the same token on many calls,
    /// and its signature (~100 µs for ES256 here) is checked once per verifier (new keys, a new verifier, an empty
    /// cache). Only tokens signed by a key of the function get in; the times are checked again on every hit.
    let verified = VerifiedTokens()
    /// A token longer than this is refused before it is decoded.
    static let maxTokenBytes = 16 << 10

    final class VerifiedTokens: Sendable {
        struct Entry {
            var expires: Date
            var notBefore: Date?
            var subject: String?
        }

        /// Past this many, the cache starts again (tokens are re-verified once each).
        static let capacity = 4096
        private let entries = Mutex<[String: Entry]>([:])

        func entry(_ token: String) -> Entry? { entries.withLock { $0[token] } }

        func insert(_ token: String, _ entry: Entry) {
            entries.withLock { entries in
                if entries.count >= Self.capacity { entries.removeAll(keepingCapacity: true) }
                entries[token] = entry
            }
        }

        var count: Int { entries.withLock { $0.count } }
    }

    /// Builds the keys: `jwks` (inline or the stored secret's value) and `hmacKey`. Every problem names the key.
    public init(settings: FunctionManifest.JWTSettings, jwks: String?, hmacKey: String?) throws(ApusError) {
        self.settings = settings
        var keys: [Key] = []
        if let jwks {
            keys += try Self.keys(fromJWKS: jwks)
        }
        if let hmacKey {
            guard hmacKey.utf8.count >= 32 else {
                throw ApusError(.badRequest, "auth.jwt.hmac_secret: the key is \(hmacKey.utf8.count) bytes; HS256 needs at least 32")
            }
            keys.append(Key(id: nil, algorithms: ["HS256", "HS384", "HS512"], material: .hmac(SymmetricKey(data: Array(hmacKey.utf8)))))
        }
        guard !keys.isEmpty else {
            throw ApusError(.badRequest, "auth.jwt: the JWKS holds no keys")
        }
        self.keys = keys
    }

    static func keys(fromJWKS text: String) throws(ApusError) -> [Key] {
        let document: Any
        do {
            document = try JSONSerialization.jsonObject(with: Data(text.utf8))
        } catch {
            throw ApusError(.badRequest, "auth.jwt: the JWKS is not JSON (\(error.localizedDescription))")
        }
        guard let object = document as? [String: Any], let entries = object["keys"] as? [Any] else {
            throw ApusError(.badRequest, "auth.jwt: a JWKS must be an object with a \"keys\" list")
        }
        guard entries.count <= 64 else {
            throw ApusError(.badRequest, "auth.jwt: the JWKS has \(entries.count) keys; at most 64 are taken")
        }
        var keys: [Key] = []
        for (index, entry) in entries.enumerated() {
            let path = "auth.jwt: JWKS key \(index)"
            guard let fields = entry as? [String: Any] else { throw ApusError(.badRequest, "\(path) is not an object") }
            if let use = fields["use"] as? String, use != "sig" { continue }  // encryption keys do not sign
            let jwk: JWK
            do {
                jwk = try JSONDecoder().decode(JWK.self, from: JSONSerialization.data(withJSONObject: fields))
            } catch {
                let kty = (fields["kty"] as? String).map { " (kty \($0))" } ?? ""
                throw ApusError(.badRequest, "\(path)\(kty) cannot be read: RSA, EC (P-256, P-384, P-521) and OKP (Ed25519) public keys are taken")
            }
            keys.append(try key(from: jwk, path: path))
        }
        return keys
    }

    private static func key(from jwk: JWK, path: String) throws(ApusError) -> Key {
        let id = jwk.keyIdentifier?.string
        let named = id.map { "\(path) (kid \($0))" } ?? path
        func bytes(_ field: String?, _ name: String) throws(ApusError) -> [UInt8] {
            guard let field, let decoded = Base64URL.decode(field), !decoded.isEmpty else {
                throw ApusError(.badRequest, "\(named): \(name) is missing or not base64url")
            }
            return decoded
        }
        if jwk.privateExponent != nil {
            throw ApusError(.badRequest, "\(named) is a private key; give the public key only")
        }
        let declared = jwk.algorithm?.rawValue
        func algorithms(_ allowed: Set<String>) throws(ApusError) -> Set<String> {
            guard let declared else { return allowed }
            guard allowed.contains(declared) else {
                throw ApusError(.badRequest, "\(named): alg \(declared) does not fit a key of this type (\(allowed.sorted().joined(separator: ", ")))")
            }
            return [declared]
        }
        switch jwk.keyType {
        case .rsa:
            let n = try bytes(jwk.modulus, "n")
            let e = try bytes(jwk.exponent, "e")
            do {
                let key = try _RSA.Signing.PublicKey(n: n, e: e)
                return Key(id: id, algorithms: try algorithms(["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]), material: .rsa(key))
            } catch let error as ApusError {
                throw error
            } catch {
                throw ApusError(.badRequest, "\(named): not a usable RSA public key (2048 bits or more): \(error)")
            }
        case .ecdsa:
            let x = try bytes(jwk.x, "x")
            let y = try bytes(jwk.y, "y")
            do {
                switch jwk.curve?.rawValue {
                case "P-256": return Key(id: id, algorithms: try algorithms(["ES256"]), material: .p256(try P256.Signing.PublicKey(rawRepresentation: x + y)))
                case "P-384": return Key(id: id, algorithms: try algorithms(["ES384"]), material: .p384(try P384.Signing.PublicKey(rawRepresentation: x + y)))
                case "P-521": return Key(id: id, algorithms: try algorithms(["ES512"]), material: .p521(try P521.Signing.PublicKey(rawRepresentation: x + y)))
                default: throw ApusError(.badRequest, "\(named): EC keys must be on P-256, P-384 or P-521 (got \(jwk.curve?.rawValue ?? "no crv"))")
                }
            } catch let error as ApusError {
                throw error
            } catch {
                throw ApusError(.badRequest, "\(named): x and y are not a point on \(jwk.curve?.rawValue ?? "the curve")")
            }
        case .octetKeyPair:
            guard jwk.curve?.rawValue == "Ed25519" else {
                throw ApusError(.badRequest, "\(named): OKP keys must be Ed25519 (got \(jwk.curve?.rawValue ?? "no crv"))")
            }
            let x = try bytes(jwk.x, "x")
            do {
                return Key(id: id, algorithms: try algorithms(["EdDSA"]), material: .ed25519(try Curve25519.Signing.PublicKey(rawRepresentation: x)))
            } catch let error as ApusError {
                throw error
            } catch {
                throw ApusError(.badRequest, "\(named): x is not an Ed25519 public key")
            }
        default:
            throw ApusError(.badRequest, "\(named): kty \(jwk.keyType.rawValue) is not taken (RSA, EC, OKP)")
        }
    }

    /// Checks a bearer token; returns its subject (if any). Throws `unauthenticated` with the reason.
    public func verify(_ token: String, now: Date) throws(ApusError) -> String? {
        guard token.utf8.count <= Self.maxTokenBytes else {
            throw ApusError(.unauthenticated, "the token is longer than \(Self.maxTokenBytes) bytes")
        }
        if let known = verified.entry(token) {
            try checkTimes(expires: known.expires, notBefore: known.notBefore, now: now)
            return known.subject
        }
        let parsed: (header: JWTHeader, payload: Claims, signature: Data)
        do {
            parsed = try DefaultJWTParser().parse(Array(token.utf8), as: Claims.self)
        } catch {
            throw ApusError(.unauthenticated, "the bearer token is not a well-formed JWT")
        }
        guard let algorithm = parsed.header.alg, algorithm != "none" else {
            throw ApusError(.unauthenticated, "the token names no signing algorithm (alg none is never accepted)")
        }
        let kid = parsed.header.kid
        let candidates = keys.filter { key in key.algorithms.contains(algorithm) && (kid == nil || key.id == nil || key.id == kid) }
        guard !candidates.isEmpty else {
            if let kid, !keys.contains(where: { $0.id == kid }) {
                throw ApusError(.unauthenticated, "no key has the token's kid \(kid.prefix(64))")
            }
            throw ApusError(.unauthenticated, "the token's algorithm \(algorithm.prefix(16)) is not one its key verifies")
        }
        // The signed part is the token up to its second dot, as sent.
        let utf8 = Array(token.utf8)
        guard let lastDot = utf8.lastIndex(of: UInt8(ascii: ".")) else {
            throw ApusError(.unauthenticated, "the bearer token is not a well-formed JWT")
        }
        let signed = utf8[..<lastDot]
        guard candidates.contains(where: { Self.verifies($0.material, algorithm: algorithm, signature: parsed.signature, signed: signed) }) else {
            throw ApusError(.unauthenticated, "the token's signature does not verify")
        }
        try checkClaims(parsed.payload, now: now)
        if let exp = parsed.payload.exp?.value {
            verified.insert(token, .init(expires: exp, notBefore: parsed.payload.nbf?.value, subject: parsed.payload.sub?.value))
        }
        return parsed.payload.sub?.value
    }

    private func checkTimes(expires: Date, notBefore: Date?, now: Date) throws(ApusError) {
        let leeway = TimeInterval(settings.leewaySeconds)
        guard expires.addingTimeInterval(leeway) > now else {
            throw ApusError(.unauthenticated, "the token expired at \(ISO8601DateFormatter().string(from: expires))")
        }
        if let notBefore, notBefore.addingTimeInterval(-leeway) > now {
            throw ApusError(.unauthenticated, "the token is not valid before \(ISO8601DateFormatter().string(from: notBefore))")
        }
    }

    private func checkClaims(_ claims: Claims, now: Date) throws(ApusError) {
        guard let exp = claims.exp else {
            throw ApusError(.unauthenticated, "the token has no exp (expiry) claim")
        }
        try checkTimes(expires: exp.value, notBefore: claims.nbf?.value, now: now)
        guard let issuer = claims.iss?.value, issuer == settings.issuer else {
            throw ApusError(.unauthenticated, "the token's issuer \(claims.iss.map { "\"\($0.value.prefix(200))\"" } ?? "(none)") is not \(settings.issuer)")
        }
        if !settings.audiences.isEmpty {
            let audiences = claims.aud?.value ?? []
            guard audiences.contains(where: settings.audiences.contains) else {
                throw ApusError(.unauthenticated, "the token's audience \(audiences.isEmpty ? "(none)" : audiences.prefix(4).joined(separator: ", ")) is not one of \(settings.audiences.joined(separator: ", "))")
            }
        }
    }

    static func verifies(_ material: Material, algorithm: String, signature: Data, signed: ArraySlice<UInt8>) -> Bool {
        switch material {
        case .rsa(let key):
            let rsaSignature = _RSA.Signing.RSASignature(rawRepresentation: signature)
            switch algorithm {
            case "RS256": return key.isValidSignature(rsaSignature, for: SHA256.hash(data: signed), padding: .insecurePKCS1v1_5)
            case "RS384": return key.isValidSignature(rsaSignature, for: SHA384.hash(data: signed), padding: .insecurePKCS1v1_5)
            case "RS512": return key.isValidSignature(rsaSignature, for: SHA512.hash(data: signed), padding: .insecurePKCS1v1_5)
            case "PS256": return key.isValidSignature(rsaSignature, for: SHA256.hash(data: signed), padding: .PSS)
            case "PS384": return key.isValidSignature(rsaSignature, for: SHA384.hash(data: signed), padding: .PSS)
            case "PS512": return key.isValidSignature(rsaSignature, for: SHA512.hash(data: signed), padding: .PSS)
            default: return false
            }
        case .p256(let key):
            guard algorithm == "ES256", let ecdsa = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(ecdsa, for: SHA256.hash(data: signed))
        case .p384(let key):
            guard algorithm == "ES384", let ecdsa = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(ecdsa, for: SHA384.hash(data: signed))
        case .p521(let key):
            guard algorithm == "ES512", let ecdsa = try? P521.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(ecdsa, for: SHA512.hash(data: signed))
        case .ed25519(let key):
            guard algorithm == "EdDSA" else { return false }
            return key.isValidSignature(signature, for: Data(signed))
        case .hmac(let key):
            switch algorithm {
            case "HS256": return HMAC<SHA256>.isValidAuthenticationCode(signature, authenticating: signed, using: key)
            case "HS384": return HMAC<SHA384>.isValidAuthenticationCode(signature, authenticating: signed, using: key)
            case "HS512": return HMAC<SHA512>.isValidAuthenticationCode(signature, authenticating: signed, using: key)
            default: return false
            }
        }
    }
}
