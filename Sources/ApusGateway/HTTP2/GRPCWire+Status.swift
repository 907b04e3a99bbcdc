import ApusCore
import ApusWire
import NIOCore
import NIOHPACK

/// How the gateway's errors travel on gRPC: a status code and trailers with a percent-encoded `grpc-message`.
extension GRPCWire {
    /// The gRPC status an `ApusError` travels as; an unknown service or method is UNIMPLEMENTED.
    static func status(for error: ApusError) -> Int {
        status(for: error.code)
    }

    /// The gRPC status code a neutral error code travels as.
    static func status(for code: ApusError.Code) -> Int {
        switch code {
        case .badRequest: statusInvalidArgument
        case .notFound: statusNotFound
        case .wrongProtocol: statusUnimplemented  // no gRPC service here
        case .conflict: 6  // ALREADY_EXISTS
        case .forbidden: 7  // PERMISSION_DENIED
        case .unauthenticated: 16  // UNAUTHENTICATED
        case .tooLarge, .overloaded: statusResourceExhausted
        case .instanceError, .unavailable: statusUnavailable
        case .deadlineExceeded: statusDeadlineExceeded
        default: statusInternal
        }
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


    /// The first complete message of a call to one of the gateway's own services; a compressed one is refused
    /// (they accept identity only).
    static func firstRequestMessage(in buffer: ByteBuffer) throws(ApusError) -> [UInt8]? {
        do throws(CompressedMessage) {
            return try firstMessage(in: buffer)
        } catch {
            throw ApusError(.badRequest, "compressed messages are not accepted here")
        }
    }
}
