#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Synchronization

/// The captured stdout/stderr of every instance, one append-only file per function:
/// `<dir>/<function>.log`, each line `2026-11-27T03:40:00.123Z v1 i-3f2a stdout| text`.
/// A file past `maxBytes` is rotated to `<function>.log.1`.
public final class FunctionLogs: Sendable {
    public let directory: URL
    public let maxBytes: Int
    private let lock = Mutex<[String: Int32]>([:])

    public init(directory: URL, maxBytes: Int = 16 << 20) throws {
        self.directory = directory
        self.maxBytes = maxBytes
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    public func fileURL(function: String) -> URL {
        directory.appendingPathComponent("\(function).log")
    }

    public func append(function: String, version: Int, instance: String, stream: String, line: String) {
        let stamp = Date().formatted(Date.ISO8601FormatStyle(includingFractionalSeconds: true))
        let text = "\(stamp) v\(version) \(instance) \(stream)| \(line)\n"
        appendRaw(function: function, text: text)
    }

    /// Records a platform event (start, exit, crash) in the function's log.
    public func event(function: String, version: Int, instance: String, _ message: String) {
        append(function: function, version: version, instance: instance, stream: "apus", line: message)
    }

    private func appendRaw(function: String, text: String) {
        let path = fileURL(function: function).path
        lock.withLock { files in
            var fd = files[function] ?? -1
            if fd < 0 {
                fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
                guard fd >= 0 else { return }
                files[function] = fd
            }
            var info = stat()
            if fstat(fd, &info) == 0, Int(info.st_size) > maxBytes {
                close(fd)
                _ = rename(path, path + ".1")
                fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
                guard fd >= 0 else { files[function] = nil; return }
                files[function] = fd
            }
            _ = text.withCString { write(fd, $0, strlen($0)) }
        }
    }

    /// The last `count` lines of a function's log.
    public func tail(function: String, count: Int) -> [String] {
        guard count > 0 else { return [] }
        let count = min(count, 1 << 20)  // the byte window below is count × 512
        let url = fileURL(function: function)
        guard let handle = try? FileHandle(forReadingFrom: url) else { return [] }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        let window = UInt64(min(Int(size), max(64 << 10, count * 512)))
        try? handle.seek(toOffset: size - window)
        let data = (try? handle.readToEnd()) ?? Data()
        var lines = String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: true)
        if window < size, !lines.isEmpty { lines.removeFirst() }  // a cut first line
        return lines.suffix(count).map(String.init)
    }

    /// Lines appended after this call, polled until the consumer stops iterating or `isActive` turns false.
    public func follow(
        function: String, pollInterval: Duration = .milliseconds(200), isActive: @escaping @Sendable () -> Bool = { true }
    ) -> AsyncStream<String> {
        let url = fileURL(function: function)
        let start = (try? FileManager.default.attributesOfItem(atPath: url.path)[.size] as? UInt64) ?? 0
        return AsyncStream { continuation in
            let task = Task {
                var offset = start
                var partial = Data()
                while !Task.isCancelled, isActive() {
                    if let handle = try? FileHandle(forReadingFrom: url) {
                        let size = (try? handle.seekToEnd()) ?? 0
                        if size < offset { offset = 0; partial = Data() }  // rotated
                        if size > offset {
                            try? handle.seek(toOffset: offset)
                            let data = (try? handle.readToEnd()) ?? Data()
                            offset += UInt64(data.count)
                            partial.append(data)
                            while let newline = partial.firstIndex(of: UInt8(ascii: "\n")) {
                                continuation.yield(String(decoding: partial[partial.startIndex..<newline], as: UTF8.self))
                                partial = Data(partial[(newline + 1)...])
                            }
                        }
                        try? handle.close()
                    }
                    try? await Task.sleep(for: pollInterval)
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Forgets a deleted function's logs.
    public func remove(function: String) {
        lock.withLock { files in
            if let fd = files.removeValue(forKey: function) { close(fd) }
        }
        try? FileManager.default.removeItem(at: fileURL(function: function))
        try? FileManager.default.removeItem(atPath: fileURL(function: function).path + ".1")
    }
}
