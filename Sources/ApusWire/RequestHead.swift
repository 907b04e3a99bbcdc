import NIOCore

/// A request head that cannot be served: the status to answer with and why.
package struct HTTPHeadError: Error {
    package var status: Int
    package var message: String

    package init(status: Int, message: String) {
        self.status = status
        self.message = message
    }
}

/// `METHOD SP target SP HTTP/1.x CRLF`, the first line of every request head (shared with the mesh sidecar).
package struct RequestLine {
    package var method: String
    /// Origin form; an absolute-form target is reduced to its path, its authority kept in `authority`.
    package var target: String
    package var authority: String?
    package var isHTTP10: Bool
    /// Offset of the line's LF: header lines start after it.
    package var lineEnd: Int

    package static func parse(_ bytes: UnsafeRawBufferPointer) throws(HTTPHeadError) -> RequestLine {
        var lineEnd = 0
        while bytes[lineEnd] != HTTPBytes.lf { lineEnd += 1 }
        let lineContentEnd = lineEnd > 0 && bytes[lineEnd - 1] == HTTPBytes.cr ? lineEnd - 1 : lineEnd
        var firstSpace = 0
        while firstSpace < lineContentEnd, bytes[firstSpace] != HTTPBytes.space { firstSpace += 1 }
        var secondSpace = lineContentEnd
        while secondSpace > firstSpace, bytes[secondSpace - 1] != HTTPBytes.space { secondSpace -= 1 }
        secondSpace -= 1
        guard firstSpace > 0, secondSpace > firstSpace + 1, lineContentEnd - secondSpace - 1 == 8 else {
            throw HTTPHeadError(status: 400, message: "malformed request line")
        }
        for i in 0..<firstSpace {
            let b = bytes[i]
            guard b > 32, b < 127, b != HTTPBytes.colon else { throw HTTPHeadError(status: 400, message: "malformed method") }
        }
        let versionRange = (secondSpace + 1)..<lineContentEnd
        let isHTTP10: Bool
        if HTTPBytes.equalsLowercase(bytes, versionRange, "http/1.1") {
            isHTTP10 = false
        } else if HTTPBytes.equalsLowercase(bytes, versionRange, "http/1.0") {
            isHTTP10 = true
        } else {
            throw HTTPHeadError(status: 505, message: "only HTTP/1.0 and HTTP/1.1 are served here")
        }
        var target = HTTPBytes.string(bytes, (firstSpace + 1)..<secondSpace)
        var authority: String?
        if target.hasPrefix("http://") || target.hasPrefix("https://") {
            // Absolute form: the authority becomes the host, the rest the path.
            let afterScheme = target[target.index(target.firstIndex(of: ":")!, offsetBy: 3)...]
            let slash = afterScheme.firstIndex(of: "/") ?? afterScheme.endIndex
            authority = String(afterScheme[..<slash])
            target = slash == afterScheme.endIndex ? "/" : String(afterScheme[slash...])
        }
        return RequestLine(method: HTTPBytes.string(bytes, 0..<firstSpace), target: target, authority: authority,
                           isHTTP10: isHTTP10, lineEnd: lineEnd)
    }
}

/// The parts of a request head the gateway acts on; every other header line is forwarded byte for byte.
package struct RequestHead {
    package var method: String
    /// The request target as received (origin form, or absolute form reduced to its path).
    package var target: String
    package var isHTTP10: Bool
    package var host: String?
    package var framing: BodyFraming
    package var keepAlive: Bool
    package var expectContinue: Bool
    package var pinnedVersion: String?
    package var forwardedFor: String?
    /// `Upgrade: h2c` with `HTTP2-Settings` and a matching `Connection` header: the client offers HTTP/2.
    package var upgradeToH2C = false
    /// Spans of header lines (with their CRLF) copied to the instance unchanged.
    package var keptSpans: ByteSpans
    /// `X-Apus-Invocation: async`: the call becomes a task.
    package var asyncInvocation = false
    /// Value ranges (in the head's bytes) of headers only an asynchronous submission reads.
    package var contentTypeValue: Range<Int>?
    package var idempotencyKeyValue: Range<Int>?
    /// `X-Apus-Callback-Url` and `X-Apus-Priority` (submissions only).
    package var callbackURL: String?
    package var priority: String?
    /// `Authorization` (at most one is taken) and its line, which `dropAuthorization` takes out of `keptSpans`.
    package var authorization: String?
    package var authorizationLine: Range<Int>?

    /// Takes the `Authorization` line out of what the instance gets (a credential the gateway checked for the
    /// function's `auth:` is not the function's to see).
    package mutating func dropAuthorization() {
        guard let line = authorizationLine else { return }
        var spans = ByteSpans()
        keptSpans.forEach { span in
            guard span.lowerBound <= line.lowerBound, line.upperBound <= span.upperBound else {
                spans.append(span)
                return
            }
            if span.lowerBound < line.lowerBound { spans.append(span.lowerBound..<line.lowerBound) }
            if line.upperBound < span.upperBound { spans.append(line.upperBound..<span.upperBound) }
        }
        keptSpans = spans
        authorizationLine = nil
    }

    package var isHEAD: Bool { method == "HEAD" }

    package typealias ParseError = HTTPHeadError

    /// Parses `bytes[0..<headEnd]` (a complete head ending in CRLFCRLF).
    package static func parse(_ bytes: UnsafeRawBufferPointer, headEnd: Int, maxBody: Int) throws(ParseError) -> RequestHead {
        let requestLine = try RequestLine.parse(bytes)
        let lineEnd = requestLine.lineEnd
        let method = requestLine.method
        let target = requestLine.target
        let isHTTP10 = requestLine.isHTTP10
        var framing = RequestFraming(host: requestLine.authority)
        var pinnedVersion: String?
        var forwardedFor: String?
        var asyncInvocation = false
        var contentTypeValue: Range<Int>?
        var idempotencyKeyValue: Range<Int>?
        var callbackURL: String?
        var priority: String?
        var authorization: String?
        var authorizationLine: Range<Int>?
        var failure: ParseError?
        var spans = ByteSpans()

        let wellFormed = HTTPBytes.forEachHeader(bytes, from: lineEnd + 1, headEnd: headEnd) { name, value, line in
            if let keep = framing.take(bytes, name: name, value: value) {
                if framing.failure != nil { return false }
                if keep { spans.append(line) }
                return true
            }
            var keep = true
            switch name.count {
            case 15 where HTTPBytes.equalsLowercase(bytes, name, "x-forwarded-for"):
                forwardedFor = HTTPBytes.string(bytes, value)
                keep = false
            case 12 where HTTPBytes.equalsLowercase(bytes, name, "content-type"):
                contentTypeValue = value
            case 15 where HTTPBytes.equalsLowercase(bytes, name, "idempotency-key"):
                idempotencyKeyValue = value
            case 13 where HTTPBytes.equalsLowercase(bytes, name, "authorization"):
                guard authorizationLine == nil else {
                    failure = ParseError(status: 400, message: "more than one Authorization header")
                    return false
                }
                authorization = HTTPBytes.string(bytes, value)
                authorizationLine = line
            default:
                if HTTPBytes.hasPrefixLowercase(bytes, name, "x-apus-") {
                    if HTTPBytes.equalsLowercase(bytes, name, "x-apus-version") {
                        pinnedVersion = HTTPBytes.string(bytes, value)
                    } else if HTTPBytes.equalsLowercase(bytes, name, "x-apus-invocation") {
                        asyncInvocation = HTTPBytes.equalsLowercase(bytes, value, "async")
                    } else if HTTPBytes.equalsLowercase(bytes, name, "x-apus-callback-url") {
                        callbackURL = HTTPBytes.string(bytes, value)
                    } else if HTTPBytes.equalsLowercase(bytes, name, "x-apus-priority") {
                        priority = HTTPBytes.string(bytes, value)
                    }
                    keep = false
                }
            }
            if keep { spans.append(line) }
            return true
        }
        if let failure = framing.failure ?? failure { throw failure }
        guard wellFormed else { throw ParseError(status: 400, message: "malformed header line") }
        var head = RequestHead(
            method: method, target: target, isHTTP10: isHTTP10, host: framing.host, framing: try framing.bodyFraming(maxBody: maxBody),
            keepAlive: framing.keepAlive(isHTTP10: isHTTP10),
            expectContinue: framing.expectContinue && !isHTTP10, pinnedVersion: pinnedVersion, forwardedFor: forwardedFor,
            upgradeToH2C: framing.upgradeOffersH2C && framing.connectionUpgrade && framing.hasHTTP2Settings && !isHTTP10,
            keptSpans: spans)
        head.asyncInvocation = asyncInvocation
        head.contentTypeValue = contentTypeValue
        head.idempotencyKeyValue = idempotencyKeyValue
        head.callbackURL = callbackURL
        head.priority = priority
        head.authorization = authorization
        head.authorizationLine = authorizationLine
        return head
    }
}

/// The parts of an instance's response head the gateway needs to frame it; forwarded otherwise unchanged
/// except for hop-by-hop connection headers. Shared with the mesh sidecar's HTTP/1.1 proxy.
package struct ResponseHead {
    package var status: Int
    package var framing: BodyFraming
    /// The instance wants this connection closed after the response.
    package var connectionClose: Bool
    /// Status line and header lines (with CRLFs) to forward, without the blank line.
    package var keptSpans: ByteSpans

    package static func parse(_ bytes: UnsafeRawBufferPointer, headEnd: Int, requestWasHEAD: Bool) -> ResponseHead? {
        var lineEnd = 0
        while bytes[lineEnd] != HTTPBytes.lf { lineEnd += 1 }
        guard lineEnd >= 12, HTTPBytes.hasPrefixLowercase(bytes, 0..<lineEnd, "http/1."),
              let status = HTTPBytes.decimal(bytes, 9..<12) else { return nil }
        let isHTTP10 = bytes[7] == UInt8(ascii: "0")
        var contentLength: Int?
        var chunked = false
        var close = isHTTP10
        var spans = ByteSpans()
        spans.append(0..<(lineEnd + 1))
        let ok = HTTPBytes.forEachHeader(bytes, from: lineEnd + 1, headEnd: headEnd) { name, value, line in
            var keep = true
            switch name.count {
            case 14 where HTTPBytes.equalsLowercase(bytes, name, "content-length"):
                contentLength = HTTPBytes.decimal(bytes, value)
            case 17 where HTTPBytes.equalsLowercase(bytes, name, "transfer-encoding"):
                chunked = HTTPBytes.containsToken(bytes, value, "chunked")
            case 10 where HTTPBytes.equalsLowercase(bytes, name, "connection"):
                if HTTPBytes.containsToken(bytes, value, "close") { close = true }
                if isHTTP10, HTTPBytes.containsToken(bytes, value, "keep-alive") { close = false }
                keep = false
            case 10 where HTTPBytes.equalsLowercase(bytes, name, "keep-alive"),
                 16 where HTTPBytes.equalsLowercase(bytes, name, "proxy-connection"):
                keep = false
            default:
                break
            }
            if keep { spans.append(line) }
            return true
        }
        guard ok else { return nil }
        let framing: BodyFraming
        if requestWasHEAD || status == 204 || status == 304 || (100..<200).contains(status) {
            framing = .none
        } else if chunked {
            framing = .chunked(ChunkedBodyScanner())
        } else if let contentLength {
            framing = contentLength == 0 ? .none : .length(remaining: contentLength)
        } else {
            framing = .untilClose
        }
        return ResponseHead(status: status, framing: framing, connectionClose: close, keptSpans: spans)
    }
}
