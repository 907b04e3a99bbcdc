import ApusWire
import NIOCore

/// What the sidecar reads from an HTTP/1.1 request head; other header lines are forwarded byte for byte.
struct ProxyRequestHead {
    var method: String
    var target: String
    var isHTTP10: Bool
    /// The Host header without its port: the upstream's name on the outbound side.
    var host: String?
    var framing: BodyFraming
    var keepAlive: Bool
    var expectContinue: Bool
    var hasTraceparent = false
    var requestID: String?
    /// `X-Apus-Deadline-Ms` (Unix epoch milliseconds) from the caller, if any.
    var deadlineEpochMs: Int?
    var caller: String?
    var keptSpans: ByteSpans
    /// Header lines the sidecar sets itself when forwarding (dropped from the copy).
    var hasBody: Bool {
        if case .none = framing { return false }
        return true
    }

    typealias ParseError = HTTPHeadError

    static func parse(_ bytes: UnsafeRawBufferPointer, headEnd: Int, dropCaller: Bool) throws(ParseError) -> ProxyRequestHead {
        // Absolute form (a client configured with the sidecar as its HTTP proxy): the authority names the upstream.
        let requestLine = try RequestLine.parse(bytes)
        let lineEnd = requestLine.lineEnd
        let isHTTP10 = requestLine.isHTTP10
        let method = requestLine.method
        let target = requestLine.target
        var host = requestLine.authority
        var contentLength: Int?
        var chunked = false
        var close = false
        var keepAliveToken = false
        var expectContinue = false
        var failure: ParseError?
        var head = ProxyRequestHead(method: method, target: target, isHTTP10: isHTTP10, host: nil, framing: .none,
                               keepAlive: true, expectContinue: false, keptSpans: ByteSpans())
        let ok = HTTPBytes.forEachHeader(bytes, from: lineEnd + 1, headEnd: headEnd) { name, value, line in
            var keep = true
            switch name.count {
            case 4 where HTTPBytes.equalsLowercase(bytes, name, "host"):
                if host == nil { host = HTTPBytes.string(bytes, value) }
            case 14 where HTTPBytes.equalsLowercase(bytes, name, "content-length"):
                guard let length = HTTPBytes.decimal(bytes, value), contentLength == nil || contentLength == length else {
                    failure = ParseError(status: 400, message: "bad Content-Length")
                    return false
                }
                contentLength = length
            case 17 where HTTPBytes.equalsLowercase(bytes, name, "transfer-encoding"):
                guard HTTPBytes.equalsLowercase(bytes, value, "chunked") else {
                    failure = ParseError(status: 501, message: "only the chunked transfer coding is supported")
                    return false
                }
                chunked = true
            case 10 where HTTPBytes.equalsLowercase(bytes, name, "connection"):
                if HTTPBytes.containsToken(bytes, value, "close") { close = true }
                if HTTPBytes.containsToken(bytes, value, "keep-alive") { keepAliveToken = true }
                keep = false
            case 6 where HTTPBytes.equalsLowercase(bytes, name, "expect"):
                if HTTPBytes.equalsLowercase(bytes, value, "100-continue") { expectContinue = true }
                keep = false
            case 10 where HTTPBytes.equalsLowercase(bytes, name, "keep-alive"),
                 16 where HTTPBytes.equalsLowercase(bytes, name, "proxy-connection"),
                 7 where HTTPBytes.equalsLowercase(bytes, name, "upgrade"),
                 14 where HTTPBytes.equalsLowercase(bytes, name, "http2-settings"),
                 2 where HTTPBytes.equalsLowercase(bytes, name, "te"):
                keep = false
            case 11 where HTTPBytes.equalsLowercase(bytes, name, "traceparent"):
                head.hasTraceparent = true
            case 12 where HTTPBytes.equalsLowercase(bytes, name, "x-request-id"):
                head.requestID = HTTPBytes.string(bytes, value)
            case 18 where HTTPBytes.equalsLowercase(bytes, name, "x-apus-deadline-ms"):
                head.deadlineEpochMs = HTTPBytes.decimal(bytes, value)
                keep = false
            case 13 where HTTPBytes.equalsLowercase(bytes, name, "x-apus-caller"):
                head.caller = HTTPBytes.string(bytes, value)
                keep = !dropCaller
            default:
                break
            }
            if keep { head.keptSpans.append(line) }
            return true
        }
        if let failure { throw failure }
        guard ok else { throw ParseError(status: 400, message: "malformed header line") }
        if chunked && contentLength != nil {
            throw ParseError(status: 400, message: "Content-Length together with Transfer-Encoding is refused")
        }
        if let host {
            // The upstream is named by the host; the port (the sidecar's own) is ignored.
            if let colon = host.lastIndex(of: ":"), !host.hasSuffix("]") {
                head.host = String(host[..<colon])
            } else {
                head.host = host
            }
        }
        head.framing = chunked ? .chunked(ChunkedBodyScanner()) : ((contentLength ?? 0) > 0 ? .length(remaining: contentLength!) : .none)
        head.keepAlive = isHTTP10 ? keepAliveToken && !close : !close
        head.expectContinue = expectContinue && !isHTTP10
        return head
    }

    /// The value of header `name` (lower-case bytes) in a raw head, for the consistent-hash key.
    static func headerValue(_ bytes: UnsafeRawBufferPointer, headEnd: Int, name: [UInt8]) -> String? {
        var lineEnd = 0
        while bytes[lineEnd] != HTTPBytes.lf { lineEnd += 1 }
        var found: String?
        _ = HTTPBytes.forEachHeader(bytes, from: lineEnd + 1, headEnd: headEnd) { n, value, _ in
            if HTTPBytes.equalsLowercase(bytes, n, name) {
                found = HTTPBytes.string(bytes, value)
                return false
            }
            return true
        }
        return found
    }
}
