extension FunctionManifest {
    /// One `secrets:` entry: the stored secret and the key in it whose value the instance gets as an environment
    /// variable (`secrets: {DB_PASSWORD: {secret: db, key: password}}`). The manifest holds the reference only; the
    /// value is read, and decrypted, each time an instance starts.
    public struct SecretReference: Codable, Hashable, Sendable, CustomStringConvertible {
        /// The stored secret's name (`apus secret set NAME KEY`).
        public var secret: String
        /// The key inside that secret.
        public var key: String

        public init(secret: String, key: String) {
            self.secret = secret
            self.key = key
        }

        public var description: String { "\(secret)/\(key)" }

        /// A secret's name: 1-253 characters of a-z, 0-9, '.', '-' and '_', starting with a letter or digit.
        public static func isSecretName(_ name: String) -> Bool {
            guard let first = name.utf8.first, name.utf8.count <= 253, isLowerAlphanumeric(first) else { return false }
            return name.utf8.allSatisfy { isLowerAlphanumeric($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") }
        }

        /// A key inside a secret: 1-253 characters of A-Z, a-z, 0-9, '.', '-' and '_' (Kubernetes' rule for the keys
        /// of a Secret).
        public static func isKeyName(_ key: String) -> Bool {
            !key.isEmpty && key.utf8.count <= 253 && key.utf8.allSatisfy { byte in
                isLowerAlphanumeric(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                    || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
            }
        }

        private static func isLowerAlphanumeric(_ byte: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
        }

        static let secretNameRule = "must be 1-253 characters of a-z, 0-9, '.', '-' and '_', starting with a letter or digit"
        static let keyNameRule = "must be 1-253 characters of A-Z, a-z, 0-9, '.', '-' and '_'"

        /// Refuses a name or key `apus secret set` could not have stored, saying what is allowed.
        public static func validate(secret: String, key: String) throws(ApusError) {
            guard isSecretName(secret) else {
                throw ApusError(.badRequest, "secret name \"\(secret.prefix(100))\" \(secretNameRule)")
            }
            guard isKeyName(key) else {
                throw ApusError(.badRequest, "secret key \"\(key.prefix(100))\" \(keyNameRule)")
            }
        }
    }

    /// `secrets: {ENV_NAME: {secret: NAME, key: KEY}, …}`: names checked as `env:` checks them (no `APUS_` names),
    /// and none may also be in `env:`.
    static func parseSecrets(_ reader: ManifestReader, env: [String: String]) throws(ApusError) -> [String: SecretReference] {
        guard let mapping = try reader.optionalMapping("secrets") else { return [:] }
        var secrets: [String: SecretReference] = [:]
        for (nameNode, valueNode) in mapping {
            guard case .scalar(let scalar) = nameNode else {
                throw ManifestReader.failure("secrets", "keys must be plain names")
            }
            let name = scalar.string
            let path = "secrets.\(name)"
            guard isEnvironmentName(name) else {
                throw ManifestReader.failure(path, "is not a valid environment variable name")
            }
            guard !name.hasPrefix("APUS_") else {
                throw ManifestReader.failure(path, "APUS_ variables are set by the platform")
            }
            guard env[name] == nil else {
                throw ManifestReader.failure(path, "is also in env:; a variable comes from env: or from secrets:, not both")
            }
            guard case .mapping(let entryMapping) = valueNode else {
                throw ManifestReader.failure(path, "must be a mapping naming a stored secret and key, e.g. {secret: db, key: password}")
            }
            secrets[name] = try parseSecretReference(ManifestReader(mapping: entryMapping, path: path), path: path)
        }
        return secrets
    }

    /// `{secret: NAME, key: KEY}` at `path` (under `secrets:`, or a key such as `auth.jwt.hmac_secret`).
    static func parseSecretReference(_ entry: ManifestReader, path: String) throws(ApusError) -> SecretReference {
        try entry.rejectUnknownKeys(allowed: ["secret", "key"])
        let secret = try entry.requiredString("secret")
        guard SecretReference.isSecretName(secret) else {
            throw ManifestReader.failure("\(path).secret", "\(SecretReference.secretNameRule) (got \"\(secret.prefix(100))\")")
        }
        let key = try entry.requiredString("key")
        guard SecretReference.isKeyName(key) else {
            throw ManifestReader.failure("\(path).key", "\(SecretReference.keyNameRule) (got \"\(key.prefix(100))\")")
        }
        return SecretReference(secret: secret, key: key)
    }
}
