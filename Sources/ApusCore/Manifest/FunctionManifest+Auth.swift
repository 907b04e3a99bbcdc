extension FunctionManifest {
    /// Who may invoke the function through the gateway (`auth:`); nil: anyone who reaches the gateway.
    ///
    /// ```yaml
    /// auth:
    ///   tokens: true                         # Apus tokens with scope invoke:<function>, invoke or admin
    ///   jwt:
    ///     issuer: https://id.example.com     # the token's iss must be exactly this
    ///     audiences: [orders]                # its aud must name one of these (optional)
    ///     jwks: '{"keys": [...]}'            # public keys inline, or
    ///     jwks_secret: {secret: idp, key: jwks}   # a JWKS held in a stored secret, and/or
    ///     hmac_secret: {secret: idp, key: hs256}  # a shared key for HS256/HS384/HS512
    ///     leeway: 60s                        # clock skew allowed on exp and nbf
    ///     forward: false                     # whether the instance sees the Authorization header
    /// ```
    ///
    /// Either credential lets the call through when both are configured. The policy is the function's: the one
    /// its latest version declares applies to every version, so pinning an older version never skips it.
    public struct AuthSettings: Codable, Hashable, Sendable {
        /// Apus bearer tokens (`apus token create NAME --scope invoke:<function>`).
        public var tokens: Bool
        public var jwt: JWTSettings?

        public init(tokens: Bool = false, jwt: JWTSettings? = nil) {
            self.tokens = tokens
            self.jwt = jwt
        }

        /// The stored secrets this policy reads (checked at deploy, read when the verifier is built).
        public var secretReferences: [(path: String, reference: SecretReference)] {
            var references: [(String, SecretReference)] = []
            if let reference = jwt?.jwksSecret { references.append(("auth.jwt.jwks_secret", reference)) }
            if let reference = jwt?.hmacSecret { references.append(("auth.jwt.hmac_secret", reference)) }
            return references
        }
    }

    /// JSON Web Tokens an identity provider signs: verified against the keys given here (never fetched), with the
    /// issuer, audience, expiry and not-before checked.
    public struct JWTSettings: Codable, Hashable, Sendable {
        public var issuer: String
        /// Empty: any audience (or none) is accepted.
        public var audiences: [String]
        /// A JWKS document (`{"keys": [...]}`) with the provider's public keys: RSA, EC P-256/P-384/P-521, Ed25519.
        public var jwks: String?
        /// A JWKS document kept in a stored secret.
        public var jwksSecret: SecretReference?
        /// A shared key (its UTF-8 bytes, at least 32) for HS256, HS384 and HS512, kept in a stored secret.
        public var hmacSecret: SecretReference?
        /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
        public var leewaySeconds: Int
        /// The verified token stays in the request the instance gets (`Authorization`); off by default.
        public var forward: Bool

        public init(issuer: String, audiences: [String] = [], jwks: String? = nil, jwksSecret: SecretReference? = nil,
                    hmacSecret: SecretReference? = nil, leewaySeconds: Int = 60, forward: Bool = false) {
            self.issuer = issuer
            self.audiences = audiences
            self.jwks = jwks
            self.jwksSecret = jwksSecret
            self.hmacSecret = hmacSecret
            self.leewaySeconds = leewaySeconds
            self.forward = forward
        }

        enum CodingKeys: String, CodingKey {
            case issuer, audiences, jwks, forward
            case jwksSecret = "jwks_secret"
            case hmacSecret = "hmac_secret"
            case leewaySeconds = "leeway_seconds"
        }
    }

    /// The largest inline `jwks:` document taken.
    public static let maxInlineJWKSBytes = 64 << 10

    static func parseAuth(_ reader: ManifestReader) throws(ApusError) -> AuthSettings? {
        guard let mapping = try reader.optionalMapping("auth") else { return nil }
        let auth = ManifestReader(mapping: mapping, path: "auth")
        try auth.rejectUnknownKeys(allowed: ["tokens", "jwt"])
        var settings = AuthSettings()
        settings.tokens = try auth.optionalBool("tokens") ?? false
        if let jwtMapping = try auth.optionalMapping("jwt") {
            settings.jwt = try parseJWT(ManifestReader(mapping: jwtMapping, path: "auth.jwt"))
        }
        guard settings.tokens || settings.jwt != nil else {
            throw ManifestReader.failure("auth", "names no credential: set tokens: true (Apus tokens with scope invoke:<function>) and/or jwt: {issuer, jwks | jwks_secret | hmac_secret}")
        }
        return settings
    }

    private static func parseJWT(_ jwt: ManifestReader) throws(ApusError) -> JWTSettings {
        try jwt.rejectUnknownKeys(allowed: ["issuer", "audiences", "jwks", "jwks_secret", "hmac_secret", "leeway", "forward"])
        let issuer = try jwt.requiredString("issuer")
        guard issuer.utf8.count <= 1024 else {
            throw ManifestReader.failure("auth.jwt.issuer", "must be at most 1024 bytes")
        }
        var settings = JWTSettings(issuer: issuer)
        if let audiences = try jwt.optionalStringList("audiences") {
            guard audiences.count <= 32 else { throw ManifestReader.failure("auth.jwt.audiences", "may list at most 32 audiences") }
            for (index, audience) in audiences.enumerated() where audience.isEmpty || audience.utf8.count > 1024 {
                throw ManifestReader.failure("auth.jwt.audiences[\(index)]", "must be 1-1024 bytes")
            }
            settings.audiences = audiences
        }
        if let jwks = try jwt.optionalString("jwks") {
            guard jwks.utf8.count <= maxInlineJWKSBytes else {
                throw ManifestReader.failure("auth.jwt.jwks", "is \(jwks.utf8.count) bytes; at most \(maxInlineJWKSBytes) are taken (keep a larger JWKS in a secret: jwks_secret)")
            }
            settings.jwks = jwks
        }
        settings.jwksSecret = try optionalSecretReference(jwt, "jwks_secret", path: "auth.jwt.jwks_secret")
        settings.hmacSecret = try optionalSecretReference(jwt, "hmac_secret", path: "auth.jwt.hmac_secret")
        if settings.jwks != nil && settings.jwksSecret != nil {
            throw ManifestReader.failure("auth.jwt", "has both jwks and jwks_secret; give the keys one way")
        }
        guard settings.jwks != nil || settings.jwksSecret != nil || settings.hmacSecret != nil else {
            throw ManifestReader.failure("auth.jwt", "has no keys: give jwks (inline public keys), jwks_secret or hmac_secret")
        }
        if let text = try jwt.optionalString("leeway") {
            guard let leeway = Duration(humanReadable: text), leeway >= .zero, leeway <= .seconds(600) else {
                throw ManifestReader.failure("auth.jwt.leeway", "must be a duration between 0s and 10m (got \"\(text.prefix(40))\")")
            }
            settings.leewaySeconds = Int(leeway.components.seconds)
        }
        settings.forward = try jwt.optionalBool("forward") ?? false
        return settings
    }

    private static func optionalSecretReference(_ reader: ManifestReader, _ key: String, path: String) throws(ApusError) -> SecretReference? {
        guard let mapping = try reader.optionalMapping(key) else { return nil }
        return try parseSecretReference(ManifestReader(mapping: mapping, path: path), path: path)
    }
}
