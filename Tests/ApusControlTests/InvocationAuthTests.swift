@testable import ApusControl
import ApusCore
import ApusStore
import Crypto
import CryptoExtras
import Foundation
import Logging
import Testing

/// Signs test tokens the way an identity provider does (JWS compact serialisation, RFC 7515).
private enum TestJWT {
    static func b64(_ bytes: some DataProtocol) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    static func json(_ object: [String: Any]) -> String {
        b64(try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
    }

    static func unsigned(header: [String: Any], claims: [String: Any]) -> String {
        json(header) + "." + json(claims)
    }

    static func claims(iss: String = "https://id.example", aud: Any? = "orders", exp: TimeInterval? = 3600, nbf: TimeInterval? = nil,
                       sub: String = "user-1", now: Date = Date()) -> [String: Any] {
        var claims: [String: Any] = ["iss": iss, "sub": sub]
        if let aud { claims["aud"] = aud }
        if let exp { claims["exp"] = Int(now.timeIntervalSince1970 + exp) }
        if let nbf { claims["nbf"] = Int(now.timeIntervalSince1970 + nbf) }
        return claims
    }

    static func es256(_ key: P256.Signing.PrivateKey, kid: String? = "k1", claims: [String: Any]) -> String {
        var header: [String: Any] = ["alg": "ES256", "typ": "JWT"]
        if let kid { header["kid"] = kid }
        let input = unsigned(header: header, claims: claims)
        return input + "." + b64(try! key.signature(for: Data(input.utf8)).rawRepresentation)
    }

    static func rsa(_ key: _RSA.Signing.PrivateKey, alg: String, kid: String = "r1", claims: [String: Any]) -> String {
        let input = unsigned(header: ["alg": alg, "kid": kid], claims: claims)
        let padding: _RSA.Signing.Padding = alg.hasPrefix("PS") ? .PSS : .insecurePKCS1v1_5
        return input + "." + b64(try! key.signature(for: SHA256.hash(data: Data(input.utf8)), padding: padding).rawRepresentation)
    }

    static func hs256(_ secret: [UInt8], kid: String? = nil, claims: [String: Any]) -> String {
        var header: [String: Any] = ["alg": "HS256"]
        if let kid { header["kid"] = kid }
        let input = unsigned(header: header, claims: claims)
        return input + "." + b64(Array(HMAC<SHA256>.authenticationCode(for: Data(input.utf8), using: SymmetricKey(data: secret))))
    }

    static func jwk(_ key: P256.Signing.PublicKey, kid: String = "k1") -> [String: Any] {
        let raw = key.rawRepresentation
        return ["kty": "EC", "crv": "P-256", "kid": kid, "x": b64(raw.prefix(32)), "y": b64(raw.suffix(32))]
    }

    static func jwk(_ key: _RSA.Signing.PublicKey, kid: String = "r1") -> [String: Any] {
        let numbers = try! key.getKeyPrimitives()
        return ["kty": "RSA", "kid": kid, "n": b64(numbers.modulus), "e": b64(numbers.publicExponent)]
    }

    static func jwks(_ keys: [[String: Any]]) -> String {
        String(decoding: try! JSONSerialization.data(withJSONObject: ["keys": keys]), as: UTF8.self)
    }
}

@Suite("per-function invocation auth")
struct InvocationAuthTests {
    let p256 = P256.Signing.PrivateKey()
    let settings = FunctionManifest.JWTSettings(issuer: "https://id.example", audiences: ["orders"], leewaySeconds: 30)

    func verifier(_ keys: [[String: Any]], hmac: String? = nil, settings: FunctionManifest.JWTSettings? = nil) throws -> JWTVerifier {
        try JWTVerifier(settings: settings ?? self.settings, jwks: keys.isEmpty ? nil : TestJWT.jwks(keys), hmacKey: hmac)
    }

    func refusal(_ verifier: JWTVerifier, _ token: String, now: Date = Date()) -> ApusError? {
        do throws(ApusError) {
            _ = try verifier.verify(token, now: now)
            return nil
        } catch {
            return error
        }
    }

    @Test func aValidES256TokenPassesAndGivesItsSubject() throws {
        let verifier = try verifier([TestJWT.jwk(p256.publicKey)])
        let token = TestJWT.es256(p256, claims: TestJWT.claims())
        #expect(try verifier.verify(token, now: Date()) == "user-1")
        // aud as a list naming one of the audiences
        #expect(refusal(verifier, TestJWT.es256(p256, claims: TestJWT.claims(aud: ["billing", "orders"]))) == nil)
        // no kid in the token: every key of the right algorithm is tried
        #expect(refusal(verifier, TestJWT.es256(p256, kid: nil, claims: TestJWT.claims())) == nil)
    }

    @Test func forgedAndTamperedTokensAreRefused() throws {
        let verifier = try verifier([TestJWT.jwk(p256.publicKey)])
        let token = TestJWT.es256(p256, claims: TestJWT.claims())
        let parts = token.split(separator: ".").map(String.init)

        // Another subject with the original signature.
        let tampered = parts[0] + "." + TestJWT.json(TestJWT.claims(sub: "admin")) + "." + parts[2]
        #expect(refusal(verifier, tampered)?.message.contains("signature does not verify") == true)
        // Signed by another key.
        #expect(refusal(verifier, TestJWT.es256(P256.Signing.PrivateKey(), claims: TestJWT.claims()))?.code == .unauthenticated)
        // alg none, with and without a signature.
        let none = TestJWT.unsigned(header: ["alg": "none"], claims: TestJWT.claims())
        #expect(refusal(verifier, none + ".")?.message.contains("alg none") == true)
        #expect(refusal(verifier, none + "." + parts[2])?.code == .unauthenticated)
        // A kid no key has.
        #expect(refusal(verifier, TestJWT.es256(p256, kid: "other", claims: TestJWT.claims()))?.message.contains("no key has the token's kid") == true)
        // Not a JWT at all, and a huge one.
        #expect(refusal(verifier, "a.b.c")?.message.contains("not a well-formed JWT") == true)
        #expect(refusal(verifier, String(repeating: "a", count: 20_000))?.message.contains("longer than") == true)
    }

    @Test func algorithmConfusionWithThePublicKeyAsAnHMACSecretIsRefused() throws {
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let verifier = try verifier([TestJWT.jwk(rsa.publicKey)])
        #expect(refusal(verifier, TestJWT.rsa(rsa, alg: "RS256", claims: TestJWT.claims())) == nil)
        #expect(refusal(verifier, TestJWT.rsa(rsa, alg: "PS256", claims: TestJWT.claims())) == nil)
        // The classic attack: HS256 keyed with the RSA public key the attacker knows.
        for secret in [Array(rsa.publicKey.pkcs1DERRepresentation), Array(rsa.publicKey.pemRepresentation.utf8)] {
            let forged = TestJWT.hs256(secret, kid: "r1", claims: TestJWT.claims())
            #expect(refusal(verifier, forged)?.message.contains("not one its key verifies") == true)
        }
        // An EC token presented to an RSA-only verifier.
        #expect(refusal(verifier, TestJWT.es256(p256, kid: "r1", claims: TestJWT.claims()))?.code == .unauthenticated)
    }

    @Test func claimsAreChecked() throws {
        let verifier = try verifier([TestJWT.jwk(p256.publicKey)])
        func token(_ claims: [String: Any]) -> String { TestJWT.es256(p256, claims: claims) }
        #expect(refusal(verifier, token(TestJWT.claims(exp: -120)))?.message.contains("expired") == true)
        #expect(refusal(verifier, token(TestJWT.claims(exp: -10))) == nil, "within the 30 s leeway")
        #expect(refusal(verifier, token(TestJWT.claims(exp: nil)))?.message.contains("no exp") == true)
        #expect(refusal(verifier, token(TestJWT.claims(nbf: 300)))?.message.contains("not valid before") == true)
        #expect(refusal(verifier, token(TestJWT.claims(nbf: 10))) == nil, "within the leeway")
        #expect(refusal(verifier, token(TestJWT.claims(iss: "https://evil.example")))?.message.contains("issuer") == true)
        #expect(refusal(verifier, token(TestJWT.claims(aud: "billing")))?.message.contains("audience") == true)
        #expect(refusal(verifier, token(TestJWT.claims(aud: nil)))?.message.contains("audience (none)") == true)
        // Without configured audiences any aud (or none) is taken.
        let open = try self.verifier([TestJWT.jwk(p256.publicKey)], settings: .init(issuer: "https://id.example"))
        #expect(refusal(open, token(TestJWT.claims(aud: nil))) == nil)
    }

    @Test func aVerifiedTokenIsRememberedButItsTimesAreCheckedOnEveryCall() throws {
        let verifier = try verifier([TestJWT.jwk(p256.publicKey)])
        let now = Date()
        let token = TestJWT.es256(p256, claims: TestJWT.claims(exp: 100, now: now))
        #expect(try verifier.verify(token, now: now) == "user-1")
        #expect(verifier.verified.count == 1)
        #expect(try verifier.verify(token, now: now.addingTimeInterval(50)) == "user-1")
        // Past exp (and the 30 s leeway) the remembered token is refused like any other.
        #expect(refusal(verifier, token, now: now.addingTimeInterval(200))?.message.contains("expired") == true)
        // Refused tokens are never remembered.
        _ = refusal(verifier, TestJWT.es256(P256.Signing.PrivateKey(), claims: TestJWT.claims()))
        _ = refusal(verifier, TestJWT.es256(p256, claims: TestJWT.claims(aud: "billing")))
        #expect(verifier.verified.count == 1)
        // A new verifier (new keys) starts empty: a token of the old key is checked against the new one.
        let rotated = try self.verifier([TestJWT.jwk(P256.Signing.PrivateKey().publicKey)])
        #expect(refusal(rotated, token, now: now)?.message.contains("signature") == true)
    }

    @Test func hmacAndEd25519Keys() throws {
        let secret = String(repeating: "s", count: 40)
        let hmac = try verifier([], hmac: secret)
        #expect(refusal(hmac, TestJWT.hs256(Array(secret.utf8), claims: TestJWT.claims())) == nil)
        #expect(refusal(hmac, TestJWT.hs256(Array((secret + "x").utf8), claims: TestJWT.claims()))?.message.contains("signature") == true)

        let ed = Curve25519.Signing.PrivateKey()
        let edVerifier = try verifier([["kty": "OKP", "crv": "Ed25519", "x": TestJWT.b64(ed.publicKey.rawRepresentation)]])
        let input = TestJWT.unsigned(header: ["alg": "EdDSA"], claims: TestJWT.claims())
        let token = input + "." + TestJWT.b64(try ed.signature(for: Data(input.utf8)))
        #expect(refusal(edVerifier, token) == nil)
    }

    @Test func badKeysAreRefusedWithTheReason() {
        func problem(_ jwks: String?, hmac: String? = nil) -> String? {
            do throws(ApusError) {
                _ = try JWTVerifier(settings: settings, jwks: jwks, hmacKey: hmac)
                return nil
            } catch {
                return error.message
            }
        }
        #expect(problem("not json")?.contains("not JSON") == true)
        #expect(problem("{\"keys\": 3}")?.contains("\"keys\" list") == true)
        #expect(problem(TestJWT.jwks([["kty": "oct", "k": "c2VjcmV0"]]))?.contains("JWKS key 0 (kty oct)") == true)
        #expect(problem(TestJWT.jwks([["kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "bad"]]))?.contains("kid bad") == true)
        #expect(problem(TestJWT.jwks([["kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"]]))?.contains("private key") == true)
        var wrongAlg = TestJWT.jwk(p256.publicKey)
        wrongAlg["alg"] = "RS256"
        #expect(problem(TestJWT.jwks([wrongAlg]))?.contains("does not fit") == true)
        #expect(problem(nil, hmac: "short")?.contains("at least 32") == true)
        #expect(problem(TestJWT.jwks([]))?.contains("no keys") == true)
        // An encryption key is skipped, not used to verify.
        var encryption = TestJWT.jwk(p256.publicKey)
        encryption["use"] = "enc"
        #expect(problem(TestJWT.jwks([encryption]))?.contains("no keys") == true)
    }

    @Test func tokensNeedTheInvokeScopeOfTheFunction() throws {
        let store = MemoryStore()
        let authority = try TokenAuthority(store: store)
        let authenticator = InvocationAuthenticator(tokens: authority, secrets: nil, logger: Logger(label: "test"))
        let auth = FunctionManifest.AuthSettings(tokens: true)
        let (_, orders) = try authority.create(name: "orders-caller", scopes: [.invokeFunction("orders")])
        let (_, everything) = try authority.create(name: "any-caller", scopes: [.invoke])
        let (_, reader) = try authority.create(name: "reader", scopes: [.read, .invokeFunction("billing")])

        func outcome(_ function: String, _ credential: String?) -> ApusError.Code? {
            do throws(ApusError) {
                #expect(try authenticator.authorize(function: function, auth: auth, credential: credential) == false, "an Apus token never reaches the instance")
                return nil
            } catch {
                return error.code
            }
        }
        #expect(outcome("orders", "Bearer \(orders)") == nil)
        #expect(outcome("orders", "bearer \(everything)") == nil)
        #expect(outcome("orders", "Bearer \(reader)") == .forbidden)
        #expect(outcome("billing", "Bearer \(orders)") == .forbidden)
        #expect(outcome("orders", nil) == .unauthenticated)
        #expect(outcome("orders", "Basic b3JkZXJzOng=") == .unauthenticated)
        #expect(outcome("orders", "Bearer apus_unknown") == .unauthenticated)
        // A JWT shown to a tokens-only function.
        #expect(outcome("orders", "Bearer " + TestJWT.es256(p256, claims: TestJWT.claims())) == .unauthenticated)
        _ = try authority.revoke(name: "orders-caller")
        #expect(outcome("orders", "Bearer \(orders)") == .unauthenticated)
    }

    @Test func jwtKeysComeFromSecretsAndFollowTheirChanges() throws {
        let store = MemoryStore()
        let sealer = SecretSealer(key: SymmetricKey(size: .bits256), keyFile: "test")
        let vault = SecretVault(store: store, sealer: sealer)
        let authenticator = InvocationAuthenticator(tokens: try TokenAuthority(store: store), secrets: vault, logger: Logger(label: "test"))
        var jwt = FunctionManifest.JWTSettings(issuer: "https://id.example")
        jwt.jwksSecret = .init(secret: "idp", key: "jwks")
        jwt.forward = true
        let auth = FunctionManifest.AuthSettings(jwt: jwt)

        // Refused at deploy while the secret is missing, naming it.
        #expect(throws: ApusError.self) { try InvocationAuthenticator.check(auth, secrets: vault) }
        _ = try vault.set(name: "idp", key: "jwks", value: TestJWT.jwks([TestJWT.jwk(p256.publicKey)]))
        try InvocationAuthenticator.check(auth, secrets: vault)

        let token = "Bearer " + TestJWT.es256(p256, claims: TestJWT.claims())
        #expect(try authenticator.authorize(function: "orders", auth: auth, credential: token) == true, "forward: true keeps the JWT")

        // The provider rotates its key: the old token stops verifying, a new one does.
        let rotated = P256.Signing.PrivateKey()
        _ = try vault.set(name: "idp", key: "jwks", value: TestJWT.jwks([TestJWT.jwk(rotated.publicKey)]))
        #expect(throws: ApusError.self) { try authenticator.authorize(function: "orders", auth: auth, credential: token) }
        _ = try authenticator.authorize(function: "orders", auth: auth, credential: "Bearer " + TestJWT.es256(rotated, claims: TestJWT.claims()))

        // The secret goes: JWT callers are refused (503, with the reason), never let through.
        try vault.delete(name: "idp", key: nil)
        do throws(ApusError) {
            _ = try authenticator.authorize(function: "orders", auth: auth, credential: "Bearer " + TestJWT.es256(rotated, claims: TestJWT.claims()))
            Issue.record("a call went through without keys")
        } catch {
            #expect(error.code == .unavailable)
        }
    }

    @Test func manifestAuthIsParsedAndCheckedWithKeyPaths() throws {
        let manifest = try FunctionManifest.parse(yaml: """
            name: orders
            runtime: python3
            handler: main.handle
            auth:
              tokens: true
              jwt:
                issuer: https://id.example
                audiences: [orders]
                hmac_secret: {secret: idp, key: hs256}
                leeway: 10s
                forward: true
            """)
        #expect(manifest.auth?.tokens == true)
        #expect(manifest.auth?.jwt?.hmacSecret == .init(secret: "idp", key: "hs256"))
        #expect(manifest.auth?.jwt?.leewaySeconds == 10)
        #expect(manifest.auth?.jwt?.forward == true)
        // Round trip through the store's JSON.
        let decoded = try JSONDecoder().decode(FunctionManifest.self, from: JSONEncoder().encode(manifest))
        #expect(decoded.auth == manifest.auth)

        func problem(_ auth: String) -> String? {
            do throws(ApusError) {
                _ = try FunctionManifest.parse(yaml: "name: orders\nruntime: python3\nhandler: main.handle\nauth:\n" + auth)
                return nil
            } catch {
                return error.message
            }
        }
        #expect(problem("  tokens: false\n")?.contains("auth: names no credential") == true)
        #expect(problem("  tokens: yes please\n")?.contains("auth.tokens: must be true or false") == true)
        #expect(problem("  jwt: {issuer: x}\n")?.contains("auth.jwt: has no keys") == true)
        #expect(problem("  jwt: {jwks: '{}'}\n")?.contains("auth.jwt.issuer: is required") == true)
        #expect(problem("  jwt: {issuer: x, jwks: '{}', jwks_secret: {secret: a, key: b}}\n")?.contains("both jwks and jwks_secret") == true)
        #expect(problem("  jwt: {issuer: x, hmac_secret: {secret: A, key: b}}\n")?.contains("auth.jwt.hmac_secret.secret") == true)
        #expect(problem("  jwt: {issuer: x, hmac_secret: {secret: a, key: b}, leeway: 1h}\n")?.contains("auth.jwt.leeway") == true)
        #expect(problem("  basic: true\n")?.contains("auth.basic: unknown key") == true)
        #expect(APIScope("invoke:orders") == .invokeFunction("orders"))
        #expect(APIScope("invoke:Bad_Name") == nil)
    }
}
