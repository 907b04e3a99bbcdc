import ApusCore
import Foundation
import Synchronization

/// One key of a stored secret as the store keeps it: the sealed value (AES-GCM nonce + ciphertext + tag, see
/// `SecretSealer`), never the value itself.
public struct SealedSecret: Sendable, Hashable {
    public var name: String
    public var key: String
    public var sealed: Data
    public var updatedAt: Date

    public init(name: String, key: String, sealed: Data, updatedAt: Date) {
        self.name = name
        self.key = key
        self.sealed = sealed
        self.updatedAt = updatedAt
    }
}

/// What a listing shows of one key of a secret: its name and when it last changed, never its value.
public struct SecretKeyInfo: Codable, Sendable, Hashable {
    public var name: String
    public var key: String
    public var updatedAt: Date

    public init(name: String, key: String, updatedAt: Date) {
        self.name = name
        self.key = key
        self.updatedAt = updatedAt
    }
}

/// Stored secrets: values sealed with the node's key before they reach the `Store`, unsealed only to start an
/// instance. Nothing here returns a value except `environment(for:)`, whose caller puts it in an instance's
/// environment.
public final class SecretVault: Sendable {
    /// The most one value may hold (it ends up in an environment variable).
    public static let maxValueBytes = 64 << 10

    public let store: any Store
    public let sealer: SecretSealer
    private let clock: @Sendable () -> Date
    private let changes = Atomic<UInt64>(0)

    /// Moves on every set and delete: what was built from secret values (a function's JWT keys) is current while
    /// this has not moved.
    public var changeCount: UInt64 { changes.load(ordering: .acquiring) }

    public init(store: any Store, sealer: SecretSealer, clock: @escaping @Sendable () -> Date = { Date() }) {
        self.store = store
        self.sealer = sealer
        self.clock = clock
    }

    /// Seals `value` and stores it as `key` of secret `name` (replacing an earlier value); returns what a listing
    /// shows of it and whether the key is new.
    public func set(name: String, key: String, value: String) throws(ApusError) -> (info: SecretKeyInfo, created: Bool) {
        try FunctionManifest.SecretReference.validate(secret: name, key: key)
        guard value.utf8.count <= Self.maxValueBytes else {
            throw ApusError(.tooLarge, "the value of secret \(name) key \(key) is \(value.utf8.count) bytes; the limit is \(Self.maxValueBytes)")
        }
        guard !value.utf8.contains(0) else {
            throw ApusError(.badRequest, "the value of secret \(name) key \(key) holds a NUL byte, which an environment variable cannot")
        }
        let now = clock()
        let sealed = try sealer.seal(value, name: name, key: key)
        let created = try store.putSecret(SealedSecret(name: name, key: key, sealed: sealed, updatedAt: now))
        changes.add(1, ordering: .releasing)
        return (SecretKeyInfo(name: name, key: key, updatedAt: now), created)
    }

    /// Every key of every secret, by name then key: names and times only.
    public func list() throws(ApusError) -> [SecretKeyInfo] {
        try store.secretKeys()
    }

    /// Removes one key of a secret, or (nil) the whole secret. Instances already running keep what they started
    /// with; one started afterwards of a function naming it fails to start.
    public func delete(name: String, key: String?) throws(ApusError) {
        try store.deleteSecret(name: name, key: key)
        changes.add(1, ordering: .releasing)
    }

    /// Refuses (naming the manifest key) references to a secret or key that is not stored: what a deploy checks.
    public func check(_ references: [String: FunctionManifest.SecretReference], keyPrefix: String = "secrets.") throws(ApusError) {
        guard !references.isEmpty else { return }
        let stored = try store.secretKeys()
        for (variable, reference) in references.sorted(by: { $0.key < $1.key }) {
            guard stored.contains(where: { $0.name == reference.secret }) else {
                throw ApusError(.badRequest, "\(FunctionManifest.fileName): \(keyPrefix)\(variable): there is no secret \(reference.secret) (store it first: apus secret set \(reference.secret) \(reference.key))")
            }
            guard stored.contains(where: { $0.name == reference.secret && $0.key == reference.key }) else {
                throw ApusError(.badRequest, "\(FunctionManifest.fileName): \(keyPrefix)\(variable): secret \(reference.secret) has no key \(reference.key) (it has \(stored.filter { $0.name == reference.secret }.map(\.key).joined(separator: ", ")); add it with apus secret set \(reference.secret) \(reference.key))")
            }
        }
    }

    /// The decrypted values of `references`, by environment variable name, read now: an instance started after a
    /// secret changed gets the new value.
    public func environment(for references: [String: FunctionManifest.SecretReference]) throws(ApusError) -> [String: String] {
        var environment: [String: String] = [:]
        for (variable, reference) in references {
            guard let sealed = try store.sealedSecret(name: reference.secret, key: reference.key) else {
                throw ApusError(.unavailable, "secrets.\(variable): secret \(reference.secret) key \(reference.key) is no longer stored (apus secret set \(reference.secret) \(reference.key))")
            }
            environment[variable] = try sealer.unseal(sealed.sealed, name: reference.secret, key: reference.key)
        }
        return environment
    }
}
