#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import Crypto
import Foundation
import Synchronization

/// Content-addressed code: archives under `blobs/sha256/<hex>.tar.gz`, each unpacked once under `unpacked/<hex>/`.
public final class CodeStore: Sendable {
    public let root: URL
    private let unpackLock = Mutex(())

    public init(root: URL) throws(ApusError) {
        self.root = root
        do {
            try FileManager.default.createDirectory(at: root.appendingPathComponent("blobs/sha256"), withIntermediateDirectories: true)
            try FileManager.default.createDirectory(at: root.appendingPathComponent("unpacked"), withIntermediateDirectories: true)
        } catch {
            throw ApusError(.internal, "cannot create code store at \(root.path): \(error)")
        }
    }

    /// Digests (hex) of archives stored by deploys that have not finished, with how many such deploys.
    private let deploying = Mutex<[String: Int]>([:])

    /// Marks an archive as in use by a deploy until `deployFinished` (garbage collection leaves it alone).
    public func deployStarted(_ digest: String) {
        guard let hex = try? hex(digest) else { return }
        deploying.withLock { $0[hex, default: 0] += 1 }
    }

    public func deployFinished(_ digest: String) {
        guard let hex = try? hex(digest) else { return }
        deploying.withLock { state in
            state[hex, default: 1] -= 1
            if state[hex] == 0 { state[hex] = nil }
        }
    }

    public static func digest(of data: Data) -> String {
        let hash = SHA256.hash(data: data)
        return "sha256:" + hash.map { String(format: "%02x", $0) }.joined()
    }

    private func hex(_ digest: String) throws(ApusError) -> String {
        let hex = digest.hasPrefix("sha256:") ? String(digest.dropFirst(7)) : ""
        guard hex.count == 64, hex.allSatisfy(\.isHexDigit) else {
            throw ApusError(.badRequest, "bad code digest \(digest)")
        }
        return hex
    }

    public func blobURL(_ digest: String) throws(ApusError) -> URL {
        root.appendingPathComponent("blobs/sha256/\(try hex(digest)).tar.gz")
    }

    /// Stores an archive and returns its digest. Storing the same bytes twice is a no-op.
    @discardableResult
    public func put(_ archive: Data) throws(ApusError) -> String {
        let digest = Self.digest(of: archive)
        let url = try blobURL(digest)
        if FileManager.default.fileExists(atPath: url.path) { return digest }
        let temp = url.deletingLastPathComponent().appendingPathComponent(".\(Identifier.make()).tmp")
        do {
            try archive.write(to: temp)
            try FileManager.default.moveItem(at: temp, to: url)
        } catch {
            try? FileManager.default.removeItem(at: temp)
            if FileManager.default.fileExists(atPath: url.path) { return digest }
            throw ApusError(.internal, "cannot store code \(digest): \(error)")
        }
        return digest
    }

    /// The directory holding the unpacked code of `digest`, unpacking it first if needed.
    /// Instances run as uids of their own, not as the deployer: unpacked code is readable by every uid (folders
    /// 0755, files 0644, or 0755 where the owner could execute them), whatever modes the archive carried. Only
    /// the function's own instances ever see it (the sandbox mounts one version's code).
    static func makeReadableByInstances(_ folder: URL) throws(ApusError) {
        let files = FileManager.default
        var paths = [folder.path]
        if let walker = files.enumerator(atPath: folder.path) {
            for case let relative as String in walker { paths.append(folder.appendingPathComponent(relative).path) }
        }
        for path in paths {
            var info = stat()
            guard lstat(path, &info) == 0 else { continue }
            let kind = info.st_mode & S_IFMT
            let mode: mode_t
            if kind == S_IFDIR {
                mode = 0o755
            } else if kind == S_IFREG {
                mode = info.st_mode & S_IXUSR != 0 ? 0o755 : 0o644
            } else {
                continue  // symlinks keep theirs
            }
            guard chmod(path, mode) == 0 else {
                throw ApusError(.internal, "cannot make unpacked code readable (\(path)): \(String(cString: strerror(errno)))")
            }
        }
    }

    /// Removes every archive and unpacked folder whose digest is not in `digests`; returns how many archives went.
    @discardableResult
    public func collectGarbage(keeping digests: Set<String>) -> Int {
        let keep = Set(digests.compactMap { try? hex($0) })
        let files = FileManager.default
        var removed = 0
        return unpackLock.withLock { _ in
            let blobs = root.appendingPathComponent("blobs/sha256")
            // Archives of deploys still under way are kept too: their versions are not recorded yet.
            let inFlight = deploying.withLock { Set($0.keys) }
            for name in (try? files.contentsOfDirectory(atPath: blobs.path)) ?? [] where name.hasSuffix(".tar.gz") {
                let hex = String(name.dropLast(".tar.gz".count))
                guard !keep.contains(hex), !inFlight.contains(hex) else { continue }
                try? files.removeItem(at: blobs.appendingPathComponent(name))
                removed += 1
            }
            let unpacked = root.appendingPathComponent("unpacked")
            for name in (try? files.contentsOfDirectory(atPath: unpacked.path)) ?? [] where !name.hasPrefix(".") && !keep.contains(name) {
                // Unpacked only from a blob: once its blob is gone (or was never kept), it goes too.
                guard !files.fileExists(atPath: blobs.appendingPathComponent("\(name).tar.gz").path) else { continue }
                try? files.removeItem(at: unpacked.appendingPathComponent(name))
            }
            return removed
        }
    }

    public func unpacked(_ digest: String) throws(ApusError) -> URL {
        let hex = try hex(digest)
        let target = root.appendingPathComponent("unpacked/\(hex)")
        return try unpackLock.withLock { _ throws(ApusError) -> URL in
            if FileManager.default.fileExists(atPath: target.path) { return target }
            let temp = root.appendingPathComponent("unpacked/.\(hex).\(Identifier.make(length: 6))")
            try CodeArchive.unpack(try blobURL(digest), into: temp)
            try Self.makeReadableByInstances(temp)
            do {
                try FileManager.default.moveItem(at: temp, to: target)
            } catch {
                try? FileManager.default.removeItem(at: temp)
                throw ApusError(.internal, "cannot place unpacked code \(digest): \(error)")
            }
            return target
        }
    }
}
