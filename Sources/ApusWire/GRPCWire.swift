import NIOCore

/// The few pieces of the gRPC-over-HTTP/2 wire format the edge reads or writes itself: `grpc-timeout`, status
/// trailers with a percent-encoded `grpc-message`, and length-prefixed message frames (for the gateway's own
/// health service). Everything else passes through as opaque bytes.
package enum GRPCWire {
    package static let statusOK = 0
    package static let statusCancelled = 1
    package static let statusInvalidArgument = 3
    package static let statusDeadlineExceeded = 4
    package static let statusNotFound = 5
    package static let statusResourceExhausted = 8
    package static let statusUnimplemented = 12
    package static let statusInternal = 13
    package static let statusUnavailable = 14

    /// gRPC status codes 0...16 as metric labels.
    private static let statusLabels: [String] = (0...16).map { String($0) }

    package static func statusCodeLabel(_ status: Int) -> String {
        statusLabels.indices.contains(status) ? statusLabels[status] : String(status)
    }

    /// Parses `grpc-timeout`: at most 8 ASCII digits and a unit (H, M, S, m, u, n).
    package static func parseTimeout(_ text: String) -> Duration? {
        let bytes = Array(text.utf8)
        guard (2...9).contains(bytes.count) else { return nil }
        var value: Int64 = 0
        for byte in bytes.dropLast() {
            guard (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) else { return nil }
            value = value * 10 + Int64(byte - UInt8(ascii: "0"))
        }
        switch bytes.last! {
        case UInt8(ascii: "H"): return .seconds(value * 3600)
        case UInt8(ascii: "M"): return .seconds(value * 60)
        case UInt8(ascii: "S"): return .seconds(value)
        case UInt8(ascii: "m"): return .milliseconds(value)
        case UInt8(ascii: "u"): return .microseconds(value)
        case UInt8(ascii: "n"): return .nanoseconds(value)
        default: return nil
        }
    }

    /// Formats a remaining time as `grpc-timeout` (milliseconds, or a coarser unit when 8 digits do not suffice).
    package static func formatTimeout(_ duration: Duration) -> String {
        let (wholeSeconds, attoseconds) = duration.components
        let milliseconds = max(1, wholeSeconds * 1000 + attoseconds / 1_000_000_000_000_000)
        if milliseconds < 100_000_000 { return "\(milliseconds)m" }
        let seconds = milliseconds / 1000
        if seconds < 100_000_000 { return "\(seconds)S" }
        return "\(min(seconds / 3600, 99_999_999))H"
    }

    /// `grpc-message` is percent-encoded UTF-8: bytes outside printable ASCII and '%' itself are escaped.
    package static func percentEncode(_ message: String) -> String {
        var out = ""
        out.reserveCapacity(message.utf8.count)
        let hex = Array("0123456789ABCDEF".utf8)
        for byte in message.utf8 {
            if byte >= 0x20, byte <= 0x7E, byte != UInt8(ascii: "%") {
                out.unicodeScalars.append(UnicodeScalar(byte))
            } else {
                out.unicodeScalars.append("%")
                out.unicodeScalars.append(UnicodeScalar(hex[Int(byte >> 4)]))
                out.unicodeScalars.append(UnicodeScalar(hex[Int(byte & 0x0F)]))
            }
        }
        return out
    }

    /// Frames one uncompressed message: flag byte 0, 4-byte big-endian length, the bytes.
    package static func frameMessage(_ message: [UInt8], allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 5 + message.count)
        buffer.writeInteger(UInt8(0))
        buffer.writeInteger(UInt32(message.count))
        buffer.writeBytes(message)
        return buffer
    }

    /// A message with the compressed flag set.
    package struct CompressedMessage: Error {}

    /// Reads the first complete message out of accumulated DATA bytes; nil while incomplete.
    /// Throws for compressed messages (the gateway's own services accept identity only).
    package static func firstMessage(in buffer: ByteBuffer) throws(CompressedMessage) -> [UInt8]? {
        guard buffer.readableBytes >= 5,
              let flag = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self),
              let length = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt32.self) else { return nil }
        guard flag == 0 else { throw CompressedMessage() }
        guard buffer.readableBytes >= 5 + Int(length) else { return nil }
        return buffer.getBytes(at: buffer.readerIndex + 5, length: Int(length))
    }
}
