import Foundation

/// Packs a function directory into a reproducible tar.gz: same files, same bytes, same digest.
/// Used by the CLI for uploads and by `apusd --deploy`.
public enum CodeArchive {
    public static let excluded = [".git", "__pycache__", "*.pyc", ".apus", ".build"]

    public static func pack(directory: URL) throws(ApusError) -> Data {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ApusError(.badRequest, "\(directory.path) is not a directory")
        }
        guard FileManager.default.fileExists(atPath: directory.appendingPathComponent(FunctionManifest.fileName).path) else {
            throw ApusError(.badRequest, "\(directory.path) has no \(FunctionManifest.fileName)")
        }
        var arguments = ["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu"]
        for pattern in excluded { arguments.append("--exclude=\(pattern)") }
        arguments += ["-C", directory.path, "-cf", "-", "."]
        let tar = try run("/usr/bin/env", ["tar"] + arguments, input: nil)
        return try run("/usr/bin/env", ["gzip", "-n", "-c"], input: tar)
    }

    /// Extracts an archive into `destination` (which must not exist yet).
    public static func unpack(_ archive: URL, into destination: URL) throws(ApusError) {
        do {
            try FileManager.default.createDirectory(at: destination, withIntermediateDirectories: true)
        } catch {
            throw ApusError(.internal, "cannot create \(destination.path): \(error)")
        }
        _ = try run("/usr/bin/env", ["tar", "--no-same-owner", "--no-same-permissions", "-xzf", archive.path, "-C", destination.path], input: nil)
    }

    /// Reads one member of an archive without extracting the rest.
    /// Archives made by `apus deploy` name members `./x`; other tools write bare `x`. Both are accepted.
    public static func readMember(_ name: String, of archive: Data) throws(ApusError) -> Data {
        do {
            return try run("/usr/bin/env", ["tar", "-xzOf", "-", "./\(name)"], input: archive, failureCode: .badRequest)
        } catch {
            return try run("/usr/bin/env", ["tar", "-xzOf", "-", name], input: archive, failureCode: .badRequest)
        }
    }

    @discardableResult
    static func run(_ executable: String, _ arguments: [String], input: Data?, failureCode: ApusError.Code = .internal) throws(ApusError) -> Data {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let stdout = Pipe()
        let stderr = Pipe()
        let stdin = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = input == nil ? FileHandle.nullDevice : stdin
        do {
            try process.run()
        } catch {
            throw ApusError(.internal, "cannot run \(arguments.first ?? executable): \(error)")
        }
        // Feed stdin from another thread so a large archive cannot deadlock against a full stdout pipe.
        if let input {
            let writer = stdin.fileHandleForWriting
            Thread.detachNewThread {
                writer.write(input)
                try? writer.close()
            }
        }
        let errorReader = ErrorCollector(stderr.fileHandleForReading)
        let output = stdout.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let errorText = errorReader.finish()
        guard process.terminationStatus == 0 else {
            let reason = errorText.split(separator: "\n").first.map(String.init) ?? "exit status \(process.terminationStatus)"
            throw ApusError(failureCode, "\(arguments.first ?? executable) failed: \(reason)")
        }
        return output
    }
}

/// Drains a pipe on its own thread so neither pipe of a child can fill up and stall it.
private final class ErrorCollector: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var data = Data()

    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            data = handle.readDataToEndOfFile()
            done.signal()
        }
    }

    func finish() -> String {
        done.wait()
        return String(decoding: data, as: UTF8.self)
    }
}
