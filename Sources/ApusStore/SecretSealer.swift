#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore
import Crypto
import Foundation

/// Seals secret values with AES-256-GCM under the node's key file (`<data-dir>/secrets.key`, 32 random bytes,
/// 0600), and unseals them again. What it seals is the combined form, 12-byte nonce + ciphertext + 16-byte tag, bound
/// to the secret's name and key (the associated data), so a sealed value moved to another name does not unseal.
/// A wrong key, a missing key file or altered bytes give an error naming the secret, never garbage.
public struct SecretSealer: Sendable {
    public static let keyFileName = "secrets.key"
    static let keyBytes = 32

    /// The key's 32 bytes (`SymmetricKey` is not `Sendable`), or why there is none (the key file is missing or
    /// malformed): every seal and unseal then fails with that reason.
    private let key: Result<Data, ApusError>
    /// Where the key came from, for messages.
    public let keyFile: String

    public init(key: SymmetricKey, keyFile: String) {
        self.key = .success(key.withUnsafeBytes { Data($0) })
        self.keyFile = keyFile
    }

    /// A sealer under a fresh random key that no file holds (tests, throwaway `MemoryStore` runs).
    public static func withNewKey(keyFile: String = "(in memory)") -> SecretSealer {
        SecretSealer(key: SymmetricKey(size: .bits256), keyFile: keyFile)
    }

    private init(problem: ApusError, keyFile: String) {
        self.key = .failure(problem)
        self.keyFile = keyFile
    }

    /// Whether the sealer has a key (it may still be the wrong one for values sealed elsewhere).
    public var hasKey: Bool {
        if case .success = key { return true }
        return false
    }

    /// Reads `<directory>/secrets.key`. When the file is absent and `mayCreate` (nothing sealed is stored yet), makes
    /// one of 32 random bytes, mode 0600; otherwise the sealer keeps the reason and refuses every call with it,
    /// rather than sealing under a new key what the old one can no longer open.
    public static func load(in directory: URL, mayCreate: Bool) throws(ApusError) -> (sealer: SecretSealer, note: String) {
        let path = directory.appendingPathComponent(keyFileName).path
        if let data = FileManager.default.contents(atPath: path) {
            chmod(path, 0o600)
            guard data.count == keyBytes else {
                let problem = ApusError(.unavailable, "the secrets key file \(path) holds \(data.count) bytes, not \(keyBytes): stored secrets cannot be unsealed (restore the key file the secrets were sealed with)")
                return (SecretSealer(problem: problem, keyFile: path), problem.message)
            }
            return (SecretSealer(key: SymmetricKey(data: data), keyFile: path), "secrets key file \(path)")
        }
        guard mayCreate else {
            let problem = ApusError(.unavailable, "the secrets key file \(path) is missing and the store holds secrets sealed with it: restore it (or delete the secrets and restart apusd to make a new key)")
            return (SecretSealer(problem: problem, keyFile: path), problem.message)
        }
        let key = SymmetricKey(size: .bits256)
        try writeKeyFile(key, to: path)
        return (SecretSealer(key: key, keyFile: path), "made secrets key file \(path) (0600)")
    }

    /// Writes the key to a new file of mode 0600 (never over an existing one).
    static func writeKeyFile(_ key: SymmetricKey, to path: String) throws(ApusError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ApusError(.internal, "cannot create the secrets key file \(path): \(String(cString: strerror(errno)))") }
        let written = key.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        fchmod(fd, 0o600)
        let synced = fsync(fd) == 0
        close(fd)
        guard written == keyBytes, synced else {
            unlink(path)
            throw ApusError(.internal, "cannot write the secrets key file \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// What binds a sealed value to its place: the secret's name and key.
    static func associatedData(name: String, key: String) -> Data {
        Data("apus-secret\u{0}\(name)\u{0}\(key)".utf8)
    }

    /// Nonce + ciphertext + tag of `value`, under a fresh random nonce.
    public func seal(_ value: String, name: String, key secretKey: String) throws(ApusError) -> Data {
        let symmetricKey: SymmetricKey
        switch key {
        case .success(let bytes): symmetricKey = SymmetricKey(data: bytes)
        case .failure(let problem): throw ApusError(problem.code, "secret \(name) key \(secretKey) cannot be sealed: \(problem.message)")
        }
        do {
            let box = try AES.GCM.seal(Data(value.utf8), using: symmetricKey, authenticating: Self.associatedData(name: name, key: secretKey))
            guard let combined = box.combined else { throw ApusError(.internal, "AES-GCM gave no combined form") }
            return combined
        } catch {
            throw ApusError(.internal, "cannot seal secret \(name) key \(secretKey): \(error)")
        }
    }

    /// The value sealed by `seal(_:name:key:)` under this key, name and key; anything else is an error naming the
    /// secret.
    public func unseal(_ sealed: Data, name: String, key secretKey: String) throws(ApusError) -> String {
        let symmetricKey: SymmetricKey
        switch key {
        case .success(let bytes): symmetricKey = SymmetricKey(data: bytes)
        case .failure(let problem): throw ApusError(problem.code, "secret \(name) key \(secretKey) cannot be unsealed: \(problem.message)")
        }
        let plain: Data
        do {
            let box = try AES.GCM.SealedBox(combined: sealed)
            plain = try AES.GCM.open(box, using: symmetricKey, authenticating: Self.associatedData(name: name, key: secretKey))
        } catch {
            throw ApusError(.unavailable, "secret \(name) key \(secretKey) cannot be decrypted with \(keyFile): it was sealed under another key, or its stored bytes were altered (set it again with apus secret set \(name) \(secretKey))")
        }
        guard let value = String(data: plain, encoding: .utf8) else {
            throw ApusError(.internal, "secret \(name) key \(secretKey) is not UTF-8 text")
        }
        return value
    }
}
