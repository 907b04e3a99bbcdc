// apus-bench-auth: what an authentication check costs, in-process, on the code the control API and the gateway
// run: a control-API bearer token (TokenAuthority: one SHA-256 and one lookup among TOKENS stored tokens), and a
// function's `auth:` check for an Apus token and for JWTs signed with ES256, RS256, EdDSA and HS256
// (InvocationAuthenticator → JWTVerifier). Each is timed over ITERATIONS calls in ROUNDS rounds; the median round
// is printed in µs per check. Used by Scripts/bench-auth.
import ApusControl
import ApusCore
import ApusStore
import Crypto
import CryptoExtras
import Foundation
import Logging

@main
enum AuthBench {
    static func main() throws {
        let iterations = Int(ProcessInfo.processInfo.environment["ITERATIONS"] ?? "") ?? 20_000
        let rounds = Int(ProcessInfo.processInfo.environment["ROUNDS"] ?? "") ?? 5
        let storedTokens = Int(ProcessInfo.processInfo.environment["TOKENS"] ?? "") ?? 100

        func b64(_ bytes: some DataProtocol) -> String {
            Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
        }

        func segment(_ object: [String: Any]) -> String {
            b64(try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]))
        }

        let now = Date()
        let claims: [String: Any] = ["iss": "https://bench.apus", "aud": "bench", "sub": "bench", "exp": Int(now.timeIntervalSince1970) + 86_400]

        func signed(_ alg: String, kid: String?, subject: String = "bench", _ sign: (Data) throws -> Data) -> String {
            var header: [String: Any] = ["alg": alg, "typ": "JWT"]
            if let kid { header["kid"] = kid }
            var body = claims
            body["sub"] = subject
            let input = segment(header) + "." + segment(body)
            return input + "." + b64(try! sign(Data(input.utf8)))
        }

        /// Median of `rounds` rounds of `iterations` calls, in µs per call.
        func measure(_ name: String, _ body: () throws -> Void) rethrows {
            var perCall: [Double] = []
            for _ in 0..<rounds {
                let start = ContinuousClock.now
                for _ in 0..<iterations { try body() }
                let elapsed = ContinuousClock.now - start
                let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                perCall.append(seconds * 1e6 / Double(iterations))
            }
            perCall.sort()
            let line = "| \(name) | \(String(format: "%.2f", perCall[perCall.count / 2])) | \(String(format: "%.2f", perCall.first!))–\(String(format: "%.2f", perCall.last!)) |"
            print(line)
        }

        let store = MemoryStore()
        let authority = try TokenAuthority(store: store)
        for i in 0..<storedTokens { _ = try authority.create(name: "t\(i)", scopes: [.read]) }
        let (_, apiSecret) = try authority.create(name: "bench", scopes: [.read, .invokeFunction("bench")])

        // Keys of the identity provider.
        let p256 = P256.Signing.PrivateKey()
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let ed = Curve25519.Signing.PrivateKey()
        let hmacSecret = String(repeating: "k", count: 48)
        let numbers = try rsa.publicKey.getKeyPrimitives()
        let raw = p256.publicKey.rawRepresentation
        let jwks: [String: Any] = ["keys": [
            ["kty": "EC", "crv": "P-256", "kid": "ec", "x": b64(raw.prefix(32)), "y": b64(raw.suffix(32))],
            ["kty": "RSA", "kid": "rsa", "n": b64(numbers.modulus), "e": b64(numbers.publicExponent)],
            ["kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(ed.publicKey.rawRepresentation)],
        ]]
        let jwksText = String(decoding: try JSONSerialization.data(withJSONObject: jwks), as: UTF8.self)
        let sealer = SecretSealer(key: SymmetricKey(size: .bits256), keyFile: "bench")
        let vault = SecretVault(store: store, sealer: sealer)
        _ = try vault.set(name: "idp", key: "hs256", value: hmacSecret)

        var jwt = FunctionManifest.JWTSettings(issuer: "https://bench.apus", audiences: ["bench"], jwks: jwksText)
        jwt.hmacSecret = .init(secret: "idp", key: "hs256")
        let auth = FunctionManifest.AuthSettings(tokens: true, jwt: jwt)
        let guardian = InvocationAuthenticator(tokens: authority, secrets: vault, logger: Logger(label: "bench"))

        let es256 = signed("ES256", kid: "ec") { try p256.signature(for: $0).rawRepresentation }
        let rs256 = signed("RS256", kid: "rsa") { try rsa.signature(for: SHA256.hash(data: $0), padding: .insecurePKCS1v1_5).rawRepresentation }
        let eddsa = signed("EdDSA", kid: "ed") { try ed.signature(for: $0) }
        let hs256 = signed("HS256", kid: nil) { Data(HMAC<SHA256>.authenticationCode(for: $0, using: SymmetricKey(data: Array(hmacSecret.utf8)))) }

        print("\(iterations) checks per round, median of \(rounds) rounds, \(storedTokens + 1) stored tokens")
        print("")
        print("| check | µs per check (median) | range over rounds |")
        print("|---|---:|---|")
        measure("control API bearer token (TokenAuthority.authenticate)") {
            guard authority.authenticate(authorization: "Bearer \(apiSecret)").token != nil else { fatalError("token refused") }
        }
        for (name, credential) in [("Apus token, scope invoke:bench", apiSecret), ("JWT ES256", es256), ("JWT RS256 (2048-bit)", rs256),
                                   ("JWT EdDSA (Ed25519)", eddsa), ("JWT HS256 (hmac_secret)", hs256)] {
            try measure("gateway auth: \(name)") {
                _ = try guardian.authorize(function: "bench", auth: auth, credential: "Bearer \(credential)")
            }
        }
        // A token the gateway has not seen yet: its signature is checked (the per-verifier cache holds the ones that
        // verified). COLD distinct tokens per algorithm, each checked once per round on a verifier of its own.
        let cold = Int(ProcessInfo.processInfo.environment["COLD"] ?? "") ?? 1000
        let signers: [(String, (String) -> String)] = [
            ("ES256", { subject in signed("ES256", kid: "ec", subject: subject) { try p256.signature(for: $0).rawRepresentation } }),
            ("RS256 (2048-bit)", { subject in signed("RS256", kid: "rsa", subject: subject) { try rsa.signature(for: SHA256.hash(data: $0), padding: .insecurePKCS1v1_5).rawRepresentation } }),
            ("EdDSA (Ed25519)", { subject in signed("EdDSA", kid: "ed", subject: subject) { try ed.signature(for: $0) } }),
            ("HS256 (hmac_secret)", { subject in signed("HS256", kid: nil, subject: subject) { Data(HMAC<SHA256>.authenticationCode(for: $0, using: SymmetricKey(data: Array(hmacSecret.utf8)))) } }),
        ]
        for (name, sign) in signers {
            let tokens = (0..<cold).map { sign("user-\($0)") }
            var perCall: [Double] = []
            for _ in 0..<rounds {
                let verifier = try JWTVerifier(settings: jwt, jwks: jwksText, hmacKey: hmacSecret)
                let start = ContinuousClock.now
                for token in tokens { _ = try verifier.verify(token, now: now) }
                let elapsed = ContinuousClock.now - start
                perCall.append((Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18) * 1e6 / Double(cold))
            }
            perCall.sort()
            print("| gateway auth: JWT \(name), first check of a token | \(String(format: "%.2f", perCall[perCall.count / 2])) | \(String(format: "%.2f", perCall.first!))–\(String(format: "%.2f", perCall.last!)) |")
        }
        measure("gateway auth: refused (no credential)") {
            do throws(ApusError) {
                _ = try guardian.authorize(function: "bench", auth: auth, credential: nil)
                fatalError("accepted")
            } catch {}
        }
    }
}
