import ApusCore
import ApusStore
import Foundation
import Testing

/// The same contract checked against every Store implementation.
@Suite("Store round trips")
struct StoreTests {
    enum Kind: String, CaseIterable { case memory, sqlite }

    static func makeStore(_ kind: Kind) throws -> (any Store, URL?) {
        switch kind {
        case .memory:
            return (MemoryStore(), nil)
        case .sqlite:
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("apus-store-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            return (try SQLiteStore(path: dir.appendingPathComponent("apus.db").path), dir)
        }
    }

    func manifest(_ name: String, concurrency: Int = 2) -> FunctionManifest {
        FunctionManifest(name: name, runtime: .python3, handler: "main.handler", concurrency: concurrency, env: ["A": "b"])
    }

    @Test(arguments: Kind.allCases)
    func scaleOverrideIsKeptAndCleared(kind: Kind) throws {
        let (store, dir) = try Self.makeStore(kind)
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        _ = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:aa", release: true, now: now)
        #expect(try store.function(named: "f")?.scale == nil)
        let updated = try store.setScale(of: "f", scale: ScaleOverride(min: 2, max: nil), now: now)
        #expect(updated.scale == ScaleOverride(min: 2, max: nil))
        #expect(try store.function(named: "f")?.scale == ScaleOverride(min: 2, max: nil))
        if let dir {
            // A new store on the same file (a restart) still has it.
            let reopened = try SQLiteStore(path: dir.appendingPathComponent("apus.db").path)
            #expect(try reopened.function(named: "f")?.scale == ScaleOverride(min: 2, max: nil))
        }
        #expect(try store.setScale(of: "f", scale: nil, now: now).scale == nil)
        #expect(throws: ApusError.self) { try store.setScale(of: "missing", scale: ScaleOverride(min: 1, max: 2), now: now) }
    }

    @Test(arguments: Kind.allCases)
    func versionsAreNumberedAndReleased(kind: Kind) throws {
        let (store, _) = try Self.makeStore(kind)
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let (v1, r1) = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:aa", release: false, now: now)
        #expect(v1.number == 1)
        #expect(r1.weights == [.init(version: 1, weight: 100)], "the first version is always released")
        let (v2, r2) = try store.createVersion(manifest: manifest("f", concurrency: 5), codeDigest: "sha256:bb", release: false, now: now)
        #expect(v2.number == 2)
        #expect(r2.weights == [.init(version: 1, weight: 100)])
        let (_, r3) = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:cc", release: true, now: now)
        #expect(r3.weights == [.init(version: 3, weight: 100)])

        let versions = try store.versions(of: "f")
        #expect(versions.map(\.number) == [1, 2, 3])
        #expect(versions[1].manifest.concurrency == 5)
        #expect(versions[1].codeDigest == "sha256:bb")
        #expect(try store.version(2, of: "f") == versions[1])
        #expect(try store.version(9, of: "f") == nil)
        #expect(try store.function(named: "f")?.latestVersion == 3)
    }

    @Test(arguments: Kind.allCases)
    func releasesAreValidated(kind: Kind) throws {
        let (store, _) = try Self.makeStore(kind)
        _ = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:aa", release: true, now: Date())
        _ = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:bb", release: false, now: Date())
        let release = try store.setRelease(of: "f", weights: [.init(version: 1, weight: 90), .init(version: 2, weight: 10)], now: Date())
        #expect(release.weights.count == 2)
        #expect(try store.function(named: "f")?.release.weights == release.weights)
        #expect(throws: ApusError.self) { try store.setRelease(of: "f", weights: [.init(version: 3, weight: 100)], now: Date()) }
        #expect(throws: ApusError.self) { try store.setRelease(of: "nope", weights: [.init(version: 1, weight: 100)], now: Date()) }
        #expect(try store.function(named: "f")?.release.weights == release.weights, "a refused release changes nothing")
    }

    @Test(arguments: Kind.allCases)
    func deleteRemovesEverything(kind: Kind) throws {
        let (store, _) = try Self.makeStore(kind)
        _ = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:aa", release: true, now: Date())
        _ = try store.createVersion(manifest: manifest("g"), codeDigest: "sha256:aa", release: true, now: Date())
        try store.deleteFunction(named: "f")
        #expect(try store.function(named: "f") == nil)
        #expect(try store.functions().map(\.name) == ["g"])
        #expect(throws: ApusError.self) { try store.versions(of: "f") }
        #expect(throws: ApusError.self) { try store.deleteFunction(named: "f") }
        let (again, _) = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:aa", release: true, now: Date())
        #expect(again.number == 1)
    }

    @Test func sqliteKeepsEverythingAcrossReopen() throws {
        let (store, dir) = try Self.makeStore(.sqlite)
        _ = try store.createVersion(manifest: manifest("f"), codeDigest: "sha256:aa", release: true, now: Date())
        _ = try store.createVersion(manifest: manifest("f", concurrency: 7), codeDigest: "sha256:bb", release: false, now: Date())
        _ = try store.setRelease(of: "f", weights: [.init(version: 1, weight: 50), .init(version: 2, weight: 50)], now: Date())
        let reopened = try SQLiteStore(path: dir!.appendingPathComponent("apus.db").path)
        #expect(try reopened.versions(of: "f") == (try store.versions(of: "f")))
        #expect(try reopened.function(named: "f")?.release.weights == [.init(version: 1, weight: 50), .init(version: 2, weight: 50)])
        #expect(try reopened.versions(of: "f")[1].manifest.concurrency == 7)
    }

    @Test func codeStoreIsContentAddressed() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("apus-code-\(UUID().uuidString)")
        let source = dir.appendingPathComponent("src")
        try FileManager.default.createDirectory(at: source, withIntermediateDirectories: true)
        try "name: f\nruntime: python3\n".write(to: source.appendingPathComponent("apus.yaml"), atomically: true, encoding: .utf8)
        try "def handler(e, c): return 'ok'\n".write(to: source.appendingPathComponent("main.py"), atomically: true, encoding: .utf8)
        let archive = try CodeArchive.pack(directory: source)
        #expect(try CodeArchive.pack(directory: source) == archive, "packing is reproducible")
        let code = try CodeStore(root: dir.appendingPathComponent("code"))
        let digest = try code.put(archive)
        #expect(digest == CodeStore.digest(of: archive))
        #expect(digest.hasPrefix("sha256:") && digest.count == 71)
        #expect(try code.put(archive) == digest)
        let unpacked = try code.unpacked(digest)
        #expect(FileManager.default.fileExists(atPath: unpacked.appendingPathComponent("main.py").path))
        let manifest = try CodeArchive.readMember("apus.yaml", of: archive)
        #expect(String(decoding: manifest, as: UTF8.self).contains("name: f"))
    }
}
