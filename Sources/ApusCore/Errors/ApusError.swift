/// The one error type that crosses module boundaries. Each edge maps `code` to its wire form
/// (an HTTP status, later a gRPC status or a Thrift `TApplicationException`).
public struct ApusError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        public let httpStatus: Int

        private init(_ name: String, _ httpStatus: Int) {
            self.name = name
            self.httpStatus = httpStatus
        }

        /// The request or manifest is malformed.
        public static let badRequest = Code("bad_request", 400)
        /// The function serves another protocol than the caller speaks (an HTTP request for a gRPC function).
        public static let wrongProtocol = Code("wrong_protocol", 400)
        /// The caller presented no credential, or one that is unknown or expired (`WWW-Authenticate: Bearer`).
        public static let unauthenticated = Code("unauthenticated", 401)
        /// The caller is known but its credential does not allow this call.
        public static let forbidden = Code("forbidden", 403)
        /// No such function, version or resource.
        public static let notFound = Code("not_found", 404)
        /// The client did not send a whole request head in time.
        public static let requestTimeout = Code("request_timeout", 408)
        /// The resource exists already or the change conflicts with current state.
        public static let conflict = Code("conflict", 409)
        /// The body is larger than the configured limit.
        public static let tooLarge = Code("payload_too_large", 413)
        /// The body's media type is not one this call takes (JSON where JSON is expected).
        public static let unsupportedMediaType = Code("unsupported_media_type", 415)
        /// Shed: the queue is full or the request cannot be served in time.
        public static let overloaded = Code("overloaded", 429)
        /// The instance failed while serving (crash, closed connection, unparseable answer).
        public static let instanceError = Code("instance_error", 502)
        /// No instance could be made ready (start failure, shutting down).
        public static let unavailable = Code("unavailable", 503)
        /// The invocation's deadline passed.
        public static let deadlineExceeded = Code("deadline_exceeded", 504)
        /// A bug or unexpected failure inside the platform.
        public static let `internal` = Code("internal", 500)

        public var description: String { name }
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.name): \(message)" }
}

extension ApusError {
    /// The JSON error envelope every HTTP-facing part returns: `{"error":{"code":"…","message":"…"}}`.
    public var jsonBody: String {
        "{\"error\":{\"code\":\(Self.jsonString(code.name)),\"message\":\(Self.jsonString(message))}}"
    }

    static func jsonString(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
