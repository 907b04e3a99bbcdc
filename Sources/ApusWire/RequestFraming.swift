/// The request headers every HTTP/1.1 reader here acts on the same way, collected while a head's lines are read:
/// `Host`, the body's framing (`Content-Length`, `Transfer-Encoding`), the `Connection` tokens, `Expect`, the h2c
/// upgrade offer, and the hop-by-hop headers that are never copied on. The gateway's `RequestHead` and the sidecar's
/// proxy head read these through it and add their own headers.
package struct RequestFraming {
    package var host: String?
    package var contentLength: Int?
    package var chunked = false
    package var connectionClose = false
    package var connectionKeepAlive = false
    package var connectionUpgrade = false
    package var upgradeOffersH2C = false
    package var hasHTTP2Settings = false
    package var expectContinue = false
    /// Set when a framing header is malformed; the reader stops there.
    package var failure: HTTPHeadError?

    /// `host`: the request line's authority (absolute form), which a `Host` header does not replace.
    package init(host: String?) {
        self.host = host
    }

    /// Reads the header `name: value` when it is one of these: nil when it is not (the caller reads it), otherwise
    /// whether its line is copied on. A malformed one sets `failure`.
    package mutating func take(_ bytes: UnsafeRawBufferPointer, name: Range<Int>, value: Range<Int>) -> Bool? {
        switch name.count {
        case 4 where HTTPBytes.equalsLowercase(bytes, name, "host"):
            if host == nil { host = HTTPBytes.string(bytes, value) }
            return true
        case 14 where HTTPBytes.equalsLowercase(bytes, name, "content-length"):
            guard let length = HTTPBytes.decimal(bytes, value), contentLength == nil || contentLength == length else {
                failure = HTTPHeadError(status: 400, message: "bad Content-Length")
                return false
            }
            contentLength = length
            return true
        case 17 where HTTPBytes.equalsLowercase(bytes, name, "transfer-encoding"):
            guard HTTPBytes.equalsLowercase(bytes, value, "chunked") else {
                failure = HTTPHeadError(status: 501, message: "only the chunked transfer coding is supported")
                return false
            }
            chunked = true
            return true
        case 10 where HTTPBytes.equalsLowercase(bytes, name, "connection"):
            if HTTPBytes.containsToken(bytes, value, "close") { connectionClose = true }
            if HTTPBytes.containsToken(bytes, value, "keep-alive") { connectionKeepAlive = true }
            if HTTPBytes.containsToken(bytes, value, "upgrade") { connectionUpgrade = true }
            return false
        case 14 where HTTPBytes.equalsLowercase(bytes, name, "http2-settings"):
            hasHTTP2Settings = true
            return false
        case 7 where HTTPBytes.equalsLowercase(bytes, name, "upgrade"):
            if HTTPBytes.containsToken(bytes, value, "h2c") { upgradeOffersH2C = true }
            return false
        case 6 where HTTPBytes.equalsLowercase(bytes, name, "expect"):
            if HTTPBytes.equalsLowercase(bytes, value, "100-continue") { expectContinue = true }
            return false
        case 10 where HTTPBytes.equalsLowercase(bytes, name, "keep-alive"),
             16 where HTTPBytes.equalsLowercase(bytes, name, "proxy-connection"),
             2 where HTTPBytes.equalsLowercase(bytes, name, "te"):
            return false
        default:
            return nil
        }
    }

    /// The body's framing once every line was read: `Content-Length` together with chunked is refused, and so is a
    /// length past `maxBody` (a chunked body is held to it as it arrives).
    package func bodyFraming(maxBody: Int = .max) throws(HTTPHeadError) -> BodyFraming {
        if chunked && contentLength != nil {
            throw HTTPHeadError(status: 400, message: "Content-Length together with Transfer-Encoding is refused")
        }
        if let contentLength, contentLength > maxBody {
            throw HTTPHeadError(status: 413, message: "request body of \(contentLength) bytes exceeds the \(maxBody)-byte limit")
        }
        if chunked { return .chunked(ChunkedBodyScanner(maxPayload: maxBody)) }
        if let contentLength, contentLength > 0 { return .length(remaining: contentLength) }
        return .none
    }

    /// Whether the connection stays open after this request (HTTP/1.0 only with `Connection: keep-alive`).
    package func keepAlive(isHTTP10: Bool) -> Bool {
        isHTTP10 ? connectionKeepAlive && !connectionClose : !connectionClose
    }
}
