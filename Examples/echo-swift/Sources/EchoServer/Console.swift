#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Whole lines to stdout and stderr, written straight to the file descriptor: nothing waits in a stdio buffer, so
/// every line reaches `apus logs` as soon as it is written, even when stdout is a pipe.
enum Console {
    static func out(_ line: String) {
        writeLine(line, to: STDOUT_FILENO)
    }

    static func error(_ line: String) {
        writeLine(line, to: STDERR_FILENO)
    }

    private static func writeLine(_ line: String, to descriptor: Int32) {
        var text = line + "\n"
        text.withUTF8 { bytes in
            guard let base = bytes.baseAddress else { return }
            var offset = 0
            while offset < bytes.count {
                let written = write(descriptor, base + offset, bytes.count - offset)
                if written > 0 {
                    offset += written
                } else if written < 0 && errno == EINTR {
                    continue
                } else {
                    return
                }
            }
        }
    }
}
