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

    /// What a deployed archive may hold, checked before anything of it is kept or read.
    public struct Limits: Sendable {
        /// Bytes of all regular files together, unpacked.
        public var maxUnpackedBytes: Int64
        /// Entries of any kind.
        public var maxEntries: Int
        /// The size of `apus.yaml`.
        public var maxManifestBytes: Int64

        public init(maxUnpackedBytes: Int64 = 512 << 20, maxEntries: Int = 20_000, maxManifestBytes: Int64 = 64 << 10) {
            self.maxUnpackedBytes = maxUnpackedBytes
            self.maxEntries = maxEntries
            self.maxManifestBytes = maxManifestBytes
        }
    }

    /// What `inspect` found.
    public struct Contents: Sendable, Equatable {
        public var entries = 0
        public var unpackedBytes: Int64 = 0
        public var manifestBytes: Int64?
    }

    /// Walks an archive's table of contents (tar's verbose listing, read as it streams) and refuses, naming the
    /// member: device nodes, FIFOs and sockets; absolute names and `..`; more entries or unpacked bytes than
    /// `limits` allow (a gzip bomb is stopped at the first header past the limit, not after unpacking it); an
    /// `apus.yaml` larger than its limit.
    public static func inspect(_ archive: Data, limits: Limits = Limits()) throws(ApusError) -> Contents {
        var contents = Contents()
        var failure: ApusError?
        var pending: [UInt8] = []  // bytes of a line not yet ended (a chunk may end inside a character)
        try stream("/usr/bin/env", ["tar", "--numeric-owner", "--absolute-names", "-tvzf", "-"], input: archive,
                   failureCode: .badRequest, failurePrefix: "code archive: ") { chunk in
            pending += chunk
            var start = 0
            while let newline = pending[start...].firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[start..<newline], as: UTF8.self)
                start = newline + 1
                if let error = check(line: line, limits: limits, contents: &contents) {
                    failure = error
                    return false
                }
            }
            pending.removeFirst(start)
            return true
        }
        if let failure { throw failure }
        if !pending.isEmpty, let error = check(line: String(decoding: pending, as: UTF8.self), limits: limits, contents: &contents) {
            throw error
        }
        return contents
    }

    /// One line of `tar -tv`: `-rw-r--r-- 0/0  1234 1970-01-01 00:00 ./name` (devices show `major,minor` as size).
    static func check(line: String, limits: Limits, contents: inout Contents) -> ApusError? {
        let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard fields.count == 6, let kind = fields[0].first else {
            return ApusError(.badRequest, "code archive: unreadable entry \"\(line.prefix(200))\"")
        }
        var name = String(fields[5])
        if kind == "l", let arrow = name.range(of: " -> ") { name = String(name[..<arrow.lowerBound]) }
        if kind == "h", let link = name.range(of: " link to ") { name = String(name[..<link.lowerBound]) }
        contents.entries += 1
        guard contents.entries <= limits.maxEntries else {
            return ApusError(.tooLarge, "code archive: more than \(limits.maxEntries) entries")
        }
        switch kind {
        case "-", "d", "l", "h":
            break
        case "c", "b":
            return ApusError(.badRequest, "code archive: \(name) is a device node; only files, folders and links are accepted")
        case "p":
            return ApusError(.badRequest, "code archive: \(name) is a FIFO; only files, folders and links are accepted")
        case "s":
            return ApusError(.badRequest, "code archive: \(name) is a socket; only files, folders and links are accepted")
        default:
            return ApusError(.badRequest, "code archive: \(name) is of an unsupported kind (\(kind)); only files, folders and links are accepted")
        }
        if name.hasPrefix("/") || name.split(separator: "/").contains("..") {
            return ApusError(.badRequest, "code archive: \(name) points outside the function folder")
        }
        guard kind == "-" else { return nil }
        guard let size = Int64(fields[2]), size >= 0 else {
            return ApusError(.badRequest, "code archive: unreadable size of \(name)")
        }
        contents.unpackedBytes += size
        if contents.unpackedBytes > limits.maxUnpackedBytes {
            return ApusError(.tooLarge, "code archive: unpacks to more than \(ByteSize.format(limits.maxUnpackedBytes)) (at \(name))")
        }
        if name == FunctionManifest.fileName || name == "./\(FunctionManifest.fileName)" {
            contents.manifestBytes = size
            if size > limits.maxManifestBytes {
                return ApusError(.tooLarge, "code archive: \(FunctionManifest.fileName) is \(ByteSize.format(size)); the limit is \(ByteSize.format(limits.maxManifestBytes))")
            }
        }
        return nil
    }

    /// Runs a command, handing its stdout to `body` as it arrives; `body` returns false to stop it early (then the
    /// command's exit status does not matter). A failure is `failureCode` with `failurePrefix` and the command's first
    /// line of stderr.
    static func stream(_ executable: String, _ arguments: [String], input: Data?, failureCode: ApusError.Code = .internal,
                       failurePrefix: String = "", _ body: (Data) -> Bool) throws(ApusError) {
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
        let reader = stdout.fileHandleForReading
        var stopped = false
        while true {
            let data = reader.availableData
            if data.isEmpty { break }
            if !body(data) {
                stopped = true
                process.terminate()
                break
            }
        }
        try? reader.close()
        process.waitUntilExit()
        let errorText = errorReader.finish()
        guard stopped || process.terminationStatus == 0 else {
            let reason = errorText.split(separator: "\n").first.map(String.init) ?? "exit status \(process.terminationStatus)"
            throw ApusError(failureCode, "\(failurePrefix)\(arguments.first ?? executable) failed: \(reason)")
        }
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

    /// Runs a command to its end and returns its stdout (`stream`, collected); the node's other command-line tools
    /// (`ip`, `nft`) run through it too.
    @discardableResult
    public static func run(_ executable: String, _ arguments: [String], input: Data?, failureCode: ApusError.Code = .internal) throws(ApusError) -> Data {
        var output = Data()
        try stream(executable, arguments, input: input, failureCode: failureCode) { chunk in
            output.append(chunk)
            return true
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
