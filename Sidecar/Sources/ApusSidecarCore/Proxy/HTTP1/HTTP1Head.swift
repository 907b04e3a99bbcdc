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
        var framing = RequestFraming(host: requestLine.authority)
        var head = ProxyRequestHead(method: method, target: target, isHTTP10: isHTTP10, host: nil, framing: .none,
                               keepAlive: true, expectContinue: false, keptSpans: ByteSpans())
        let ok = HTTPBytes.forEachHeader(bytes, from: lineEnd + 1, headEnd: headEnd) { name, value, line in
            if let keep = framing.take(bytes, name: name, value: value) {
                if framing.failure != nil { return false }
                if keep { head.keptSpans.append(line) }
                return true
            }
            var keep = true
            switch name.count {
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
        if let failure = framing.failure { throw failure }
        guard ok else { throw ParseError(status: 400, message: "malformed header line") }
        head.framing = try framing.bodyFraming()
        if let host = framing.host {
            // The upstream is named by the host; the port (the sidecar's own) is ignored.
            if let colon = host.lastIndex(of: ":"), !host.hasSuffix("]") {
                head.host = String(host[..<colon])
            } else {
                head.host = host
            }
        }
        head.keepAlive = framing.keepAlive(isHTTP10: isHTTP10)
        head.expectContinue = framing.expectContinue && !isHTTP10
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
