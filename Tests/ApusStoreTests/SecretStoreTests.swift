import ApusCore
import ApusStore
import Foundation
import Testing

/// AES-GCM sealing of secrets and their keeping in every Store implementation.
@Suite("secrets: sealing, the key file, the store")
struct SecretStoreTests {
    static func temporaryDirectory() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("apus-secrets-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    func failure(_ body: () throws -> Void) -> String {
        do {
            try body()
            return "succeeded"
        } catch let error as ApusError {
            return error.message
        } catch {
            return "not an ApusError: \(error)"
        }
    }

    @Test func sealsAndUnsealsWithAFreshNonceEachTime() throws {
        let sealer = SecretSealer.withNewKey(keyFile: "/k")
        let first = try sealer.seal("hunter2", name: "db", key: "password")
        let second = try sealer.seal("hunter2", name: "db", key: "password")
        #expect(first != second)
        #expect(first.count == 12 + "hunter2".utf8.count + 16)
        #expect(!String(decoding: first, as: UTF8.self).contains("hunter2"))
        #expect(try sealer.unseal(first, name: "db", key: "password") == "hunter2")
        #expect(try sealer.unseal(second, name: "db", key: "password") == "hunter2")
        #expect(try sealer.unseal(try sealer.seal("", name: "db", key: "empty"), name: "db", key: "empty") == "")
    }

    @Test func tamperingWrongKeysAndMovedValuesAreErrorsNamingTheSecret() throws {
        let sealer = SecretSealer.withNewKey(keyFile: "/data/secrets.key")
        let sealed = try sealer.seal("hunter2", name: "db", key: "password")
        for index in [0, 12, sealed.count - 1] {  // nonce, ciphertext, tag
            var tampered = sealed
            tampered[tampered.startIndex + index] ^= 0x01
            let message = failure { _ = try sealer.unseal(tampered, name: "db", key: "password") }
            #expect(message.hasPrefix("secret db key password cannot be decrypted with /data/secrets.key"), "\(message)")
        }
        #expect(failure { _ = try sealer.unseal(sealed.prefix(10), name: "db", key: "password") }.hasPrefix("secret db key password cannot be decrypted"))
        // Bound to its name and key: the same bytes under another name do not unseal.
        #expect(failure { _ = try sealer.unseal(sealed, name: "db", key: "user") }.hasPrefix("secret db key user cannot be decrypted"))
        #expect(failure { _ = try sealer.unseal(sealed, name: "other", key: "password") }.hasPrefix("secret other key password cannot be decrypted"))
        let otherKey = SecretSealer.withNewKey(keyFile: "/data/secrets.key")
        #expect(failure { _ = try otherKey.unseal(sealed, name: "db", key: "password") }.hasPrefix("secret db key password cannot be decrypted"))
    }

    @Test func theKeyFileIsMadeOnceAndNeverRemadeOverSealedSecrets() throws {
        let dir = try Self.temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent(SecretSealer.keyFileName).path
        let (made, note) = try SecretSealer.load(in: dir, mayCreate: true)
        #expect(note.hasPrefix("made secrets key file"))
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        #expect((attributes[.size] as? Int) == 32)
        let sealed = try made.seal("v", name: "s", key: "k")
        let (loaded, _) = try SecretSealer.load(in: dir, mayCreate: true)
        #expect(try loaded.unseal(sealed, name: "s", key: "k") == "v")

        try FileManager.default.removeItem(atPath: path)
        let (missing, problem) = try SecretSealer.load(in: dir, mayCreate: false)
        #expect(!missing.hasKey && problem.contains("is missing"))
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(failure { _ = try missing.unseal(sealed, name: "s", key: "k") }.hasPrefix("secret s key k cannot be unsealed: the secrets key file"))
        #expect(failure { _ = try missing.seal("v", name: "s", key: "k") }.hasPrefix("secret s key k cannot be sealed"))

        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: path))
        let (short, _) = try SecretSealer.load(in: dir, mayCreate: true)
        #expect(!short.hasKey)
    }

    @Test(arguments: StoreTests.Kind.allCases)
    func vaultKeepsOnlySealedValues(kind: StoreTests.Kind) throws {
        let (store, dir) = try StoreTests.makeStore(kind)
        let vault = SecretVault(store: store, sealer: SecretSealer.withNewKey(keyFile: "/k"))
        #expect(try vault.set(name: "db", key: "password", value: "hunter2").created)
        #expect(try vault.set(name: "db", key: "user", value: "app").created)
        #expect(try !vault.set(name: "db", key: "password", value: "hunter3").created)
        #expect(try vault.list().map { "\($0.name)/\($0.key)" } == ["db/password", "db/user"])
        let stored = try #require(try store.sealedSecret(name: "db", key: "password"))
        #expect(!String(decoding: stored.sealed, as: UTF8.self).contains("hunter3"))
        #expect(try vault.environment(for: ["DB_PASSWORD": .init(secret: "db", key: "password")]) == ["DB_PASSWORD": "hunter3"])
        if let dir {
            for suffix in ["", "-wal"] {
                let raw = (try? Data(contentsOf: dir.appendingPathComponent("apus.db" + suffix))) ?? Data()
                #expect(raw.range(of: Data("hunter".utf8)) == nil)
            }
        }

        try vault.check(["A": .init(secret: "db", key: "user")])
        #expect(failure { try vault.check(["A": .init(secret: "nosuch", key: "k")]) }.contains("secrets.A: there is no secret nosuch"))
        #expect(failure { try vault.check(["A": .init(secret: "db", key: "absent")]) }.contains("secrets.A: secret db has no key absent"))
        #expect(failure { _ = try vault.set(name: "Bad Name", key: "k", value: "v") }.hasPrefix("secret name"))
        #expect(failure { _ = try vault.set(name: "db", key: "k", value: "a\u{0}b") }.contains("NUL"))

        try vault.delete(name: "db", key: "user")
        #expect(try vault.list().map(\.key) == ["password"])
        #expect(failure { try vault.delete(name: "db", key: "user") } == "secret db has no key user")
        try vault.delete(name: "db", key: nil)
        #expect(try vault.list().isEmpty)
        #expect(failure { try vault.delete(name: "db", key: nil) } == "there is no secret db")
        #expect(failure { _ = try vault.environment(for: ["X": .init(secret: "db", key: "password")]) }.contains("is no longer stored"))
    }
}
