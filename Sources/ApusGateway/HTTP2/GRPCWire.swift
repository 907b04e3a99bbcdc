import ApusCore
import NIOCore
import NIOHPACK

/// The few pieces of the gRPC-over-HTTP/2 wire format the edge reads or writes itself: `grpc-timeout`, status
/// trailers with a percent-encoded `grpc-message`, and length-prefixed message frames (for the gateway's own
/// health service). Everything else passes through as opaque bytes.
enum GRPCWire {
    static let statusOK = 0
    static let statusCancelled = 1
    static let statusInvalidArgument = 3
    static let statusDeadlineExceeded = 4
    static let statusNotFound = 5
    static let statusResourceExhausted = 8
    static let statusUnimplemented = 12
    static let statusInternal = 13
    static let statusUnavailable = 14

    /// gRPC status codes 0...16 as metric labels.
    private static let statusLabels: [String] = (0...16).map { String($0) }

    static func statusCodeLabel(_ status: Int) -> String {
        statusLabels.indices.contains(status) ? statusLabels[status] : String(status)
    }

    /// Parses `grpc-timeout`: at most 8 ASCII digits and a unit (H, M, S, m, u, n).
    static func parseTimeout(_ text: String) -> Duration? {
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
    static func formatTimeout(_ duration: Duration) -> String {
        let milliseconds = max(1, duration.milliseconds)
        if milliseconds < 100_000_000 { return "\(milliseconds)m" }
        let seconds = milliseconds / 1000
        if seconds < 100_000_000 { return "\(seconds)S" }
        return "\(min(seconds / 3600, 99_999_999))H"
    }

    /// `grpc-message` is percent-encoded UTF-8: bytes outside printable ASCII and '%' itself are escaped.
    static func percentEncode(_ message: String) -> String {
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

    /// The gRPC status an `ApusError` travels as; an unknown service or method is UNIMPLEMENTED.
    static func status(for error: ApusError) -> Int {
        error.code.grpcStatus
    }

    /// A complete response carrying only a status (Trailers-Only), for calls that fail before any response.
    static func trailersOnly(status: Int, message: String) -> HPACKHeaders {
        var headers = HPACKHeaders()
        headers.reserveCapacity(4)
        headers.add(name: ":status", value: "200")
        headers.add(name: "content-type", value: "application/grpc")
        headers.add(name: "grpc-status", value: String(status))
        if !message.isEmpty { headers.add(name: "grpc-message", value: percentEncode(message)) }
        return headers
    }

    /// Trailers ending a response whose headers were already sent.
    static func trailers(status: Int, message: String) -> HPACKHeaders {
        var headers = HPACKHeaders()
        headers.add(name: "grpc-status", value: String(status))
        if !message.isEmpty { headers.add(name: "grpc-message", value: percentEncode(message)) }
        return headers
    }

    /// Frames one uncompressed message: flag byte 0, 4-byte big-endian length, the bytes.
    static func frameMessage(_ message: [UInt8], allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 5 + message.count)
        buffer.writeInteger(UInt8(0))
        buffer.writeInteger(UInt32(message.count))
        buffer.writeBytes(message)
        return buffer
    }

    /// Reads the first complete message out of accumulated DATA bytes; nil while incomplete.
    /// Throws for compressed messages (the gateway's own services accept identity only).
    static func firstMessage(in buffer: ByteBuffer) throws(ApusError) -> [UInt8]? {
        guard buffer.readableBytes >= 5,
              let flag = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self),
              let length = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt32.self) else { return nil }
        guard flag == 0 else { throw ApusError(.badRequest, "compressed messages are not accepted here") }
        guard buffer.readableBytes >= 5 + Int(length) else { return nil }
        return buffer.getBytes(at: buffer.readerIndex + 5, length: Int(length))
    }
}
