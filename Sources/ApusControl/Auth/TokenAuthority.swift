import ApusCore
import ApusStore
import Crypto
import Foundation
import Logging
import Synchronization

/// Who may call the control API: the stored tokens (by the SHA-256 of their secret, cached in memory so a check
/// costs one hash and one dictionary lookup), the sidecars' tokens apusd mints for itself, and the per-task
/// progress capabilities handed to functions.
public final class TokenAuthority: Sendable {
    /// What an `Authorization` header proves.
    public enum Verdict: Sendable, Equatable {
        case valid(APIToken)
        /// No `Authorization: Bearer …` header.
        case missing
        /// A bearer secret no token has (never made, or revoked).
        case unknown
        case expired(APIToken)

        public var token: APIToken? {
            if case .valid(let token) = self { return token }
            return nil
        }

        /// Why the caller is refused (401), or nil when the token is valid.
        public var problem: String? {
            switch self {
            case .valid: nil
            case .missing: "this call needs a bearer token (Authorization: Bearer <token>; the local admin token is in <data-dir>/admin.token)"
            case .unknown: "the bearer token is not known (never made, or revoked)"
            case .expired(let token): "the bearer token \(token.name) expired at \(ISO8601DateFormatter().string(from: token.expiresAt ?? Date()))"
            }
        }
    }

    private struct State {
        /// Stored tokens by hash.
        var stored: [String: APIToken] = [:]
        /// Tokens apusd made for its own sidecars, by hash; never stored, gone when apusd stops (with the sidecars).
        var minted: [String: APIToken] = [:]
        /// The sidecar secret of each mesh service.
        var sidecarSecrets: [String: String] = [:]
    }

    public static let adminTokenFileName = "admin.token"

    private let store: any Store
    private let state: Mutex<State>
    /// Key of the task progress capabilities; new with every run (a running task's URL is handed out anew on
    /// every attempt, and a restart ends every attempt).
    private let progressKey: [UInt8] = {
        var generator = SystemRandomNumberGenerator()
        return (0..<32).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
    }()
    private let clock: @Sendable () -> Date

    public init(store: any Store, clock: @escaping @Sendable () -> Date = { Date() }) throws(ApusError) {
        self.store = store
        self.clock = clock
        var state = State()
        for token in try store.tokens() { state.stored[token.hash] = token }
        self.state = Mutex(state)
    }

    // MARK: checking

    /// The token an `Authorization` header carries.
    public func authenticate(authorization: String?) -> Verdict {
        guard let secret = TokenSecret.bearer(authorization) else { return .missing }
        let hash = TokenSecret.hash(secret)
        guard let token = state.withLock({ $0.stored[hash] ?? $0.minted[hash] }) else { return .unknown }
        return token.isExpired(at: clock()) ? .expired(token) : .valid(token)
    }

    // MARK: managing

    /// Makes a token; returns it and its secret, which exists nowhere else afterwards.
    public func create(name: String, scopes: [APIScope], expiresIn: Duration? = nil) throws(ApusError) -> (token: APIToken, secret: String) {
        try APIToken.validateName(name)
        guard !scopes.isEmpty else { throw ApusError(.badRequest, "scopes: give at least one scope") }
        if let expiresIn, expiresIn <= .zero { throw ApusError(.badRequest, "expires: must be a positive duration such as 24h") }
        let secret = TokenSecret.generate()
        let now = clock()
        var unique: [APIScope] = []
        for scope in scopes where !unique.contains(scope) { unique.append(scope) }
        let token = APIToken(
            id: TokenSecret.identifier("tok-"), name: name, hash: TokenSecret.hash(secret), scopes: unique, createdAt: now,
            expiresAt: expiresIn.map { now.addingTimeInterval($0.seconds) })
        try store.createToken(token)
        state.withLock { $0.stored[token.hash] = token }
        return (token, secret)
    }

    /// The stored tokens, by name (no secrets: there are none to show).
    public func list() throws(ApusError) -> [APIToken] {
        try store.tokens()
    }

    /// Revokes a stored token: every later call with it is refused.
    @discardableResult
    public func revoke(name: String) throws(ApusError) -> APIToken {
        let token = try store.deleteToken(named: name)
        _ = state.withLock { $0.stored.removeValue(forKey: token.hash) }
        return token
    }

    /// The secret of the token the sidecars of `service` use: `registry:<service>` only, made on first use and kept
    /// in memory for this run.
    public func sidecarSecret(service: String) -> String {
        state.withLock { state in
            if let secret = state.sidecarSecrets[service] { return secret }
            let secret = TokenSecret.generate()
            let token = APIToken(
                id: TokenSecret.identifier("sidecar-"), name: "sidecar:\(service)", hash: TokenSecret.hash(secret),
                scopes: [.registry(service: service)], createdAt: clock())
            state.minted[token.hash] = token
            state.sidecarSecrets[service] = secret
            return secret
        }
    }

    // MARK: task progress capabilities

    /// The capability that lets its holder post progress for `taskID` and nothing else: HMAC-SHA256 of the id
    /// under this run's random key, base64url.
    public func progressCapability(taskID: String) -> String {
        Base64URL.encode(HMAC<SHA256>.authenticationCode(for: Array(taskID.utf8), using: SymmetricKey(data: progressKey)))
    }

    public func isProgressCapability(_ capability: String, for taskID: String) -> Bool {
        TokenSecret.constantTimeEqual(progressCapability(taskID: taskID), capability)
    }

    // MARK: the local admin token

    /// On first start (no valid token in `<data-dir>/admin.token` and no admin token in the store) makes an admin
    /// token and writes its secret there, readable by apusd's user alone (0600), for the local `apus` to find.
    /// Returns what it did, for the log.
    public func ensureAdminTokenFile(in dataDirectory: URL) throws(ApusError) -> String {
        let file = dataDirectory.appendingPathComponent(Self.adminTokenFileName)
        if let text = try? String(contentsOf: file, encoding: .utf8) {
            let secret = text.trimmingCharacters(in: .whitespacesAndNewlines)
            if case .valid = authenticate(authorization: "Bearer " + secret) {
                chmod(file.path, 0o600)
                return "admin token file \(file.path) holds a valid token"
            }
        }
        let stored = try store.tokens()
        if stored.contains(where: { $0.scopes.contains(.admin) && !$0.isExpired(at: clock()) }) {
            return "the store holds admin tokens and \(file.path) none of them: not making one (apus token create, or remove the admin tokens to start over)"
        }
        var name = "admin"
        var suffix = 2
        while stored.contains(where: { $0.name == name }) {
            name = "admin-\(suffix)"
            suffix += 1
        }
        let (token, secret) = try create(name: name, scopes: [.admin])
        try Self.writePrivately(secret + "\n", to: file)
        return "made admin token \(token.name), its secret in \(file.path) (0600)"
    }

    /// Writes `text` to a new file of mode 0600 and renames it over `file`.
    static func writePrivately(_ text: String, to file: URL) throws(ApusError) {
        let temp = file.deletingLastPathComponent().appendingPathComponent(".\(file.lastPathComponent).tmp")
        unlink(temp.path)
        let fd = open(temp.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ApusError(.internal, "cannot create \(temp.path): \(String(cString: strerror(errno)))") }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        fchmod(fd, 0o600)
        close(fd)
        guard written == bytes.count, rename(temp.path, file.path) == 0 else {
            unlink(temp.path)
            throw ApusError(.internal, "cannot write \(file.path): \(String(cString: strerror(errno)))")
        }
    }
}
