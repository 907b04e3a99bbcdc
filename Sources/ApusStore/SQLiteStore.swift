import ApusCore
import Foundation
import GRDB

/// The embedded `Store`: one SQLite file (WAL mode) in the data directory.
public final class SQLiteStore: Store {
    private let database: DatabaseQueue
    private static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    public init(path: String) throws(ApusError) {
        do {
            var configuration = Configuration()
            configuration.busyMode = .timeout(5)
            database = try DatabaseQueue(path: path, configuration: configuration)
            try Self.migrator.migrate(database)
        } catch {
            throw ApusError(.internal, "cannot open store \(path): \(error)")
        }
    }

    private static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE functions (
                    name TEXT PRIMARY KEY NOT NULL,
                    latest_version INTEGER NOT NULL,
                    release_json TEXT NOT NULL,
                    created_at DOUBLE NOT NULL,
                    updated_at DOUBLE NOT NULL
                );
                CREATE TABLE versions (
                    function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
                    number INTEGER NOT NULL,
                    code_digest TEXT NOT NULL,
                    manifest_json TEXT NOT NULL,
                    created_at DOUBLE NOT NULL,
                    PRIMARY KEY (function, number)
                );
                """)
        }
        migrator.registerMigration("v2-scale-override") { db in
            try db.execute(sql: "ALTER TABLE functions ADD COLUMN scale_json TEXT")
        }
        // Control-API tokens: the secret is never stored, only its SHA-256.
        migrator.registerMigration("v3-api-tokens") { db in
            try db.execute(sql: """
                CREATE TABLE api_tokens (
                    id TEXT PRIMARY KEY NOT NULL,
                    name TEXT NOT NULL UNIQUE,
                    sha256 TEXT NOT NULL UNIQUE,
                    scopes_json TEXT NOT NULL,
                    created_at DOUBLE NOT NULL,
                    expires_at DOUBLE
                );
                """)
        }
        // Secrets: only the AES-GCM sealed value (nonce + ciphertext + tag) of each key, never the value.
        migrator.registerMigration("v4-secrets") { db in
            try db.execute(sql: """
                CREATE TABLE secrets (
                    name TEXT NOT NULL,
                    key TEXT NOT NULL,
                    sealed BLOB NOT NULL,
                    updated_at DOUBLE NOT NULL,
                    PRIMARY KEY (name, key)
                );
                """)
        }
        return migrator
    }

    private func read<T>(_ body: (Database) throws -> T) throws(ApusError) -> T {
        do {
            return try database.read(body)
        } catch let error as ApusError {
            throw error
        } catch {
            throw ApusError(.internal, "store read failed: \(error)")
        }
    }

    private func write<T>(_ body: (Database) throws -> T) throws(ApusError) -> T {
        do {
            return try database.write(body)
        } catch let error as ApusError {
            throw error
        } catch {
            throw ApusError(.internal, "store write failed: \(error)")
        }
    }

    private static func json<T: Encodable>(_ value: T) throws -> String {
        String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    private static func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(text.utf8))
    }

    private static func record(from row: Row) throws -> FunctionRecord {
        FunctionRecord(
            name: row["name"],
            latestVersion: row["latest_version"],
            release: try decode(Release.self, row["release_json"]),
            createdAt: Date(timeIntervalSince1970: row["created_at"]),
            updatedAt: Date(timeIntervalSince1970: row["updated_at"]),
            scale: try (row["scale_json"] as String?).map { try decode(ScaleOverride.self, $0) })
    }

    private static func version(from row: Row) throws -> FunctionVersion {
        FunctionVersion(
            function: row["function"],
            number: row["number"],
            codeDigest: row["code_digest"],
            manifest: try decode(FunctionManifest.self, row["manifest_json"]),
            createdAt: Date(timeIntervalSince1970: row["created_at"]))
    }

    public func createVersion(manifest: FunctionManifest, codeDigest: String, release: Bool, now: Date) throws(ApusError) -> (FunctionVersion, Release) {
        try write { db in
            let name = manifest.name
            let existing = try Row.fetchOne(db, sql: "SELECT * FROM functions WHERE name = ?", arguments: [name]).map(Self.record(from:))
            let number = (existing?.latestVersion ?? 0) + 1
            let version = FunctionVersion(function: name, number: number, codeDigest: codeDigest, manifest: manifest, createdAt: now)
            var currentRelease = existing?.release ?? Release(function: name, weights: [], updatedAt: now)
            if release || currentRelease.weights.isEmpty {
                currentRelease = Release(function: name, weights: [.init(version: number, weight: 100)], updatedAt: now)
            }
            if existing == nil {
                try db.execute(
                    sql: "INSERT INTO functions (name, latest_version, release_json, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    arguments: [name, number, try Self.json(currentRelease), now.timeIntervalSince1970, now.timeIntervalSince1970])
            } else {
                try db.execute(
                    sql: "UPDATE functions SET latest_version = ?, release_json = ?, updated_at = ? WHERE name = ?",
                    arguments: [number, try Self.json(currentRelease), now.timeIntervalSince1970, name])
            }
            try db.execute(
                sql: "INSERT INTO versions (function, number, code_digest, manifest_json, created_at) VALUES (?, ?, ?, ?, ?)",
                arguments: [name, number, codeDigest, try Self.json(manifest), now.timeIntervalSince1970])
            return (version, currentRelease)
        }
    }

    public func functions() throws(ApusError) -> [FunctionRecord] {
        try read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM functions ORDER BY name").map(Self.record(from:))
        }
    }

    public func function(named name: String) throws(ApusError) -> FunctionRecord? {
        try read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM functions WHERE name = ?", arguments: [name]).map(Self.record(from:))
        }
    }

    public func versions(of name: String) throws(ApusError) -> [FunctionVersion] {
        _ = try requireFunction(name)
        return try read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM versions WHERE function = ? ORDER BY number", arguments: [name])
                .map(Self.version(from:))
        }
    }

    public func version(_ number: Int, of name: String) throws(ApusError) -> FunctionVersion? {
        try read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM versions WHERE function = ? AND number = ?", arguments: [name, number])
                .map(Self.version(from:))
        }
    }

    public func setRelease(of name: String, weights: [Release.Weight], now: Date) throws(ApusError) -> Release {
        try write { db in
            guard try Row.fetchOne(db, sql: "SELECT name FROM functions WHERE name = ?", arguments: [name]) != nil else {
                throw ApusError(.notFound, "function \(name) does not exist")
            }
            let numbers = try Int.fetchAll(db, sql: "SELECT number FROM versions WHERE function = ?", arguments: [name])
            try Release.validate(weights: weights, existingVersions: Set(numbers))
            let release = Release(function: name, weights: weights, updatedAt: now)
            try db.execute(
                sql: "UPDATE functions SET release_json = ?, updated_at = ? WHERE name = ?",
                arguments: [try Self.json(release), now.timeIntervalSince1970, name])
            return release
        }
    }

    public func setScale(of name: String, scale: ScaleOverride?, now: Date) throws(ApusError) -> FunctionRecord {
        try write { db in
            try db.execute(
                sql: "UPDATE functions SET scale_json = ?, updated_at = ? WHERE name = ?",
                arguments: [try scale.map { try Self.json($0) }, now.timeIntervalSince1970, name])
            guard db.changesCount > 0,
                  let record = try Row.fetchOne(db, sql: "SELECT * FROM functions WHERE name = ?", arguments: [name]).map(Self.record(from:))
            else {
                throw ApusError(.notFound, "function \(name) does not exist")
            }
            return record
        }
    }

    public func deleteFunction(named name: String) throws(ApusError) {
        try write { db in
            try db.execute(sql: "DELETE FROM versions WHERE function = ?", arguments: [name])
            try db.execute(sql: "DELETE FROM functions WHERE name = ?", arguments: [name])
            guard db.changesCount > 0 else {
                throw ApusError(.notFound, "function \(name) does not exist")
            }
        }
    }

    private static func token(from row: Row) throws -> APIToken {
        APIToken(
            id: row["id"], name: row["name"], hash: row["sha256"],
            scopes: try decode([APIScope].self, row["scopes_json"]),
            createdAt: Date(timeIntervalSince1970: row["created_at"]),
            expiresAt: (row["expires_at"] as Double?).map { Date(timeIntervalSince1970: $0) })
    }

    public func createToken(_ token: APIToken) throws(ApusError) {
        try write { db in
            guard try Row.fetchOne(db, sql: "SELECT id FROM api_tokens WHERE name = ?", arguments: [token.name]) == nil else {
                throw ApusError(.conflict, "a token named \(token.name) exists already")
            }
            try db.execute(
                sql: "INSERT INTO api_tokens (id, name, sha256, scopes_json, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                arguments: [token.id, token.name, token.hash, try Self.json(token.scopes), token.createdAt.timeIntervalSince1970,
                            token.expiresAt?.timeIntervalSince1970])
        }
    }

    public func tokens() throws(ApusError) -> [APIToken] {
        try read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM api_tokens ORDER BY name").map(Self.token(from:))
        }
    }

    public func deleteToken(named name: String) throws(ApusError) -> APIToken {
        try write { db in
            guard let token = try Row.fetchOne(db, sql: "SELECT * FROM api_tokens WHERE name = ?", arguments: [name]).map(Self.token(from:)) else {
                throw ApusError(.notFound, "no token named \(name)")
            }
            try db.execute(sql: "DELETE FROM api_tokens WHERE id = ?", arguments: [token.id])
            return token
        }
    }

    public func putSecret(_ secret: SealedSecret) throws(ApusError) -> Bool {
        try write { db in
            let existed = try Row.fetchOne(db, sql: "SELECT 1 FROM secrets WHERE name = ? AND key = ?", arguments: [secret.name, secret.key]) != nil
            try db.execute(
                sql: """
                    INSERT INTO secrets (name, key, sealed, updated_at) VALUES (?, ?, ?, ?)
                    ON CONFLICT (name, key) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at
                    """,
                arguments: [secret.name, secret.key, secret.sealed, secret.updatedAt.timeIntervalSince1970])
            return !existed
        }
    }

    public func secretKeys() throws(ApusError) -> [SecretKeyInfo] {
        try read { db in
            try Row.fetchAll(db, sql: "SELECT name, key, updated_at FROM secrets ORDER BY name, key").map { row in
                SecretKeyInfo(name: row["name"], key: row["key"], updatedAt: Date(timeIntervalSince1970: row["updated_at"]))
            }
        }
    }

    public func sealedSecret(name: String, key: String) throws(ApusError) -> SealedSecret? {
        try read { db in
            try Row.fetchOne(db, sql: "SELECT * FROM secrets WHERE name = ? AND key = ?", arguments: [name, key]).map { row in
                SealedSecret(name: row["name"], key: row["key"], sealed: row["sealed"], updatedAt: Date(timeIntervalSince1970: row["updated_at"]))
            }
        }
    }

    public func deleteSecret(name: String, key: String?) throws(ApusError) {
        try write { db in
            if let key {
                try db.execute(sql: "DELETE FROM secrets WHERE name = ? AND key = ?", arguments: [name, key])
                guard db.changesCount > 0 else {
                    let known = try Row.fetchOne(db, sql: "SELECT 1 FROM secrets WHERE name = ?", arguments: [name]) != nil
                    throw ApusError(.notFound, known ? "secret \(name) has no key \(key)" : "there is no secret \(name)")
                }
            } else {
                try db.execute(sql: "DELETE FROM secrets WHERE name = ?", arguments: [name])
                guard db.changesCount > 0 else { throw ApusError(.notFound, "there is no secret \(name)") }
            }
        }
    }
}
