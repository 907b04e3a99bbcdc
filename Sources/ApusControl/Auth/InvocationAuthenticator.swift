import ApusCore
import ApusStore
import Foundation
import Logging
import Synchronization

/// The gateway's check for functions with `auth:` (`InvocationGuard`): Apus tokens through the `TokenAuthority`
/// (scope `invoke:<function>`, `invoke` or `admin`), JWTs through a `JWTVerifier` built from the function's keys
/// on first use and kept while neither its `auth:` nor the stored secrets change.
public final class InvocationAuthenticator: InvocationGuard {
    private struct CompiledJWT {
        var settings: FunctionManifest.JWTSettings
        var secretsGeneration: UInt64
        var verifier: Result<JWTVerifier, ApusError>
    }

    private let tokens: TokenAuthority
    private let secrets: SecretVault?
    private let compiled = Mutex<[String: CompiledJWT]>([:])
    private let clock: @Sendable () -> Date
    private let logger: Logger

    public init(tokens: TokenAuthority, secrets: SecretVault?, logger: Logger, clock: @escaping @Sendable () -> Date = { Date() }) {
        self.tokens = tokens
        self.secrets = secrets
        self.logger = logger
        self.clock = clock
    }

    public func authorize(function: String, auth: FunctionManifest.AuthSettings, credential: String?) throws(ApusError) -> Bool {
        guard let bearer = TokenSecret.bearer(credential) else {
            throw ApusError(.unauthenticated, "function \(function) needs a bearer token (Authorization: Bearer <token>): \(Self.accepted(auth, function: function))")
        }
        // A JWT has two dots; an Apus token never has one, so the credential's shape picks the check.
        let looksLikeJWT = bearer.utf8.lazy.filter { $0 == UInt8(ascii: ".") }.count == 2
        if looksLikeJWT, let jwt = auth.jwt {
            _ = try verifier(function: function, settings: jwt).verify(bearer, now: clock())
            return jwt.forward
        }
        if auth.tokens, !looksLikeJWT {
            switch tokens.authenticate(authorization: "Bearer " + bearer) {
            case .valid(let token):
                guard APIScope.allowInvoking(function, scopes: token.scopes) else {
                    throw ApusError(.forbidden, "token \(token.name) may not invoke function \(function): it needs scope invoke:\(function) (or invoke, or admin); it has \(token.scopes.map(\.description).joined(separator: ", "))")
                }
                return false
            case let verdict:
                throw ApusError(.unauthenticated, verdict.problem ?? "the bearer token is not valid")
            }
        }
        throw ApusError(.unauthenticated, "function \(function) does not take this kind of token: \(Self.accepted(auth, function: function))")
    }

    static func accepted(_ auth: FunctionManifest.AuthSettings, function: String) -> String {
        var kinds: [String] = []
        if auth.tokens { kinds.append("an Apus token with scope invoke:\(function)") }
        if let jwt = auth.jwt { kinds.append("a JWT issued by \(jwt.issuer)") }
        return "it takes " + kinds.joined(separator: " or ")
    }

    /// The function's verifier, built now if its settings or the secrets changed since it was last built. A policy
    /// whose keys cannot be built refuses every JWT with the reason (and the deploy that introduced it was refused
    /// by `check`, so this happens only when a secret changed under it).
    private func verifier(function: String, settings: FunctionManifest.JWTSettings) throws(ApusError) -> JWTVerifier {
        let generation = secrets?.changeCount ?? 0
        if let cached = compiled.withLock({ $0[function] }), cached.settings == settings, cached.secretsGeneration == generation {
            return try cached.verifier.get()
        }
        let result: Result<JWTVerifier, ApusError>
        do throws(ApusError) {
            result = .success(try Self.build(settings, secrets: secrets))
        } catch {
            logger.warning("function's JWT keys cannot be built; its JWT callers are refused", metadata: ["function": "\(function)", "reason": "\(error.message)"])
            result = .failure(ApusError(.unavailable, "function \(function)'s JWT keys cannot be used: \(error.message)"))
        }
        compiled.withLock { $0[function] = CompiledJWT(settings: settings, secretsGeneration: generation, verifier: result) }
        return try result.get()
    }

    static func build(_ settings: FunctionManifest.JWTSettings, secrets: SecretVault?) throws(ApusError) -> JWTVerifier {
        var jwks = settings.jwks
        var hmacKey: String?
        if let reference = settings.jwksSecret { jwks = try secretValue(reference, path: "auth.jwt.jwks_secret", secrets: secrets) }
        if let reference = settings.hmacSecret { hmacKey = try secretValue(reference, path: "auth.jwt.hmac_secret", secrets: secrets) }
        return try JWTVerifier(settings: settings, jwks: jwks, hmacKey: hmacKey)
    }

    private static func secretValue(_ reference: FunctionManifest.SecretReference, path: String, secrets: SecretVault?) throws(ApusError) -> String {
        guard let secrets else { throw ApusError(.badRequest, "\(path): this node keeps no secrets") }
        try secrets.check([path: reference], keyPrefix: "")
        let values = try secrets.environment(for: [path: reference])
        guard let value = values[path] else { throw ApusError(.badRequest, "\(path): secret \(reference) is not stored") }
        return value
    }

    /// Refuses (at deploy) an `auth:` whose keys cannot be built: a malformed JWKS, a missing secret, a short HMAC
    /// key; each named.
    public static func check(_ auth: FunctionManifest.AuthSettings, secrets: SecretVault?) throws(ApusError) {
        guard let jwt = auth.jwt else { return }
        do throws(ApusError) {
            _ = try build(jwt, secrets: secrets)
        } catch {
            throw ApusError(.badRequest, error.message.hasPrefix(FunctionManifest.fileName) ? error.message : "\(FunctionManifest.fileName): \(error.message)")
        }
    }
}
