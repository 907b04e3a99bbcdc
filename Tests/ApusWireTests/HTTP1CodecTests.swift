import NIOCore
import Testing

@testable import ApusWire

@Suite("minimal HTTP/1.1 codec")
struct HTTP1CodecTests {
    func parse(_ text: String, maxBody: Int = 1 << 20) throws(RequestHead.ParseError) -> RequestHead {
        let bytes = Array(text.utf8)
        let result: Result<RequestHead, RequestHead.ParseError> = bytes.withUnsafeBytes { raw in
            guard let end = HTTPBytes.endOfHead(raw) else { return .failure(RequestHead.ParseError(status: 0, message: "incomplete")) }
            do throws(RequestHead.ParseError) {
                return .success(try RequestHead.parse(raw, headEnd: end, maxBody: maxBody))
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    @Test func endOfHeadIsFoundAtAnySplit() {
        let text = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\nbody".utf8)
        for cut in 0..<text.count {
            let found = text[..<cut].withUnsafeBytes { HTTPBytes.endOfHead($0) }
            #expect(found == (cut >= 27 ? 27 : nil), "cut at \(cut)")
        }
    }

    @Test func requestHeadFields() throws {
        let head = try parse("POST /f/x?y=1 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 12\r\nX-Apus-Version: 2\r\nX-Apus-Other: z\r\nConnection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\nAccept: */*\r\n\r\n")
        #expect(head.method == "POST")
        #expect(head.target == "/f/x?y=1")
        #expect(head.host == "h:1")
        #expect(head.pinnedVersion == "2")
        #expect(head.forwardedFor == "10.0.0.1")
        #expect(head.keepAlive && !head.isHTTP10 && !head.expectContinue)
        guard case .length(12) = head.framing else { Issue.record("framing \(head.framing)"); return }
        // Kept: Host, Content-Length (one span), Accept (another span); dropped: X-Apus-*, Connection, X-Forwarded-For.
        #expect(head.keptSpans.count == 2)
    }

    @Test func connectionSemantics() throws {
        #expect(try !parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keepAlive)
        #expect(try !parse("GET / HTTP/1.0\r\n\r\n").keepAlive)
        #expect(try parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keepAlive)
        #expect(try parse("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").expectContinue)
        #expect(try parse("GET http://fn.example/a?b HTTP/1.1\r\n\r\n").target == "/a?b")
        #expect(try parse("GET http://fn.example/a?b HTTP/1.1\r\n\r\n").host == "fn.example")
    }

    @Test(arguments: [
        ("NOT HTTP\r\n\r\n", 400),
        ("GET / HTTP/2.0\r\n\r\n", 505),
        ("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
    ])
    func malformedHeadsAreRefused(text: String, status: Int) {
        do {
            _ = try parse(text)
            Issue.record("accepted \(text.debugDescription)")
        } catch {
            #expect(error.status == status)
        }
    }

    @Test func responseHeadFraming() {
        func parse(_ text: String, head: Bool = false) -> ResponseHead? {
            Array(text.utf8).withUnsafeBytes { raw in
                ResponseHead.parse(raw, headEnd: HTTPBytes.endOfHead(raw)!, requestWasHEAD: head)
            }
        }
        let plain = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-A: b\r\n\r\n")!
        #expect(plain.status == 200 && !plain.connectionClose)
        guard case .length(5) = plain.framing else { Issue.record("\(plain.framing)"); return }
        #expect(plain.keptSpans.count == 2, "status line + Content-Length, then X-A (Connection dropped)")
        #expect(parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head: true).map { if case .none = $0.framing { true } else { false } } == true)
        #expect(parse("HTTP/1.1 204 No Content\r\n\r\n").map { if case .none = $0.framing { true } else { false } } == true)
        #expect(parse("HTTP/1.0 200 OK\r\n\r\n")!.connectionClose)
        #expect(parse("HTTP/1.1 200 OK\r\n\r\n").map { if case .untilClose = $0.framing { true } else { false } } == true)
        #expect(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").map { if case .chunked = $0.framing { true } else { false } } == true)
        #expect(parse("garbage\r\n\r\n") == nil)
    }

    @Test func h2cUpgradeIsOfferedOnlyWithAllThreeHeaders() throws {
        let codec = self
        let full = try codec.parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nAccept: */*\r\n\r\n")
        #expect(full.upgradeToH2C)
        let noSettings = try codec.parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        #expect(!noSettings.upgradeToH2C)
        let websocket = try codec.parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: websocket\r\nHTTP2-Settings: x\r\n\r\n")
        #expect(!websocket.upgradeToH2C)
        let http10 = try codec.parse("GET / HTTP/1.0\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n")
        #expect(!http10.upgradeToH2C)
        // The upgrade headers never reach an instance.
        #expect(full.keptSpans.count >= 1)
    }
}

@Suite("chunked body scanner")
struct ChunkedBodyScannerTests {
    let body = Array("5\r\nhello\r\n1;ext=1\r\n \r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n".utf8)

    @Test func findsTheEndInOnePiece() throws {
        var scanner = ChunkedBodyScanner()
        let extra = Array("GET / HTTP/1.1".utf8)
        let consumed = try (body + extra).withUnsafeBytes { try scanner.scan($0) }
        #expect(consumed == body.count)
        #expect(scanner.isDone)
        #expect(scanner.payloadBytes == 22)
    }

    @Test func findsTheEndFedByteByByte() throws {
        var scanner = ChunkedBodyScanner()
        var total = 0
        for byte in body {
            #expect(!scanner.isDone)
            total += try [byte].withUnsafeBytes { try scanner.scan($0) }
        }
        #expect(scanner.isDone && total == body.count)
    }

    @Test func findsTheEndAtEverySplit() throws {
        for cut in 0...body.count {
            var scanner = ChunkedBodyScanner()
            let first = try body[..<cut].withUnsafeBytes { try scanner.scan($0) }
            let second = try body[cut...].withUnsafeBytes { try scanner.scan($0) }
            #expect(first + second == body.count && scanner.isDone, "split at \(cut)")
        }
    }

    @Test func refusesMalformedAndOversized() {
        var bad = ChunkedBodyScanner()
        #expect(throws: ChunkedBodyScanner.ScanError.malformed) { try Array("zz\r\n".utf8).withUnsafeBytes { try bad.scan($0) } }
        var noCRLF = ChunkedBodyScanner()
        #expect(throws: ChunkedBodyScanner.ScanError.malformed) { try Array("2\r\nabX".utf8).withUnsafeBytes { try noCRLF.scan($0) } }
        var limited = ChunkedBodyScanner(maxPayload: 4)
        #expect(throws: ChunkedBodyScanner.ScanError.tooLarge) { try Array("5\r\n".utf8).withUnsafeBytes { try limited.scan($0) } }
    }
}

@Suite("response reader")
struct ResponseReaderTests {
    /// What a caller saw, in order: "interim 100", "head 200", body bytes (concatenated), "complete reusable".
    struct Seen: Equatable {
        var events: [String] = []
        var body: [UInt8] = []
    }

    /// Feeds `chunks` to a reader the way the proxies do (unread bytes stay at the front of a buffer), then the
    /// upstream closing its side if `close`.
    static func read(_ chunks: [[UInt8]], requestWasHEAD: Bool = false, close: Bool = false, decoded: Bool = false) -> Seen {
        var reader = ResponseReader()
        reader.begin(requestWasHEAD: requestWasHEAD)
        var seen = Seen()
        var buffer: [UInt8] = []
        feeding: for chunk in chunks {
            buffer += chunk
            while true {
                var payload: [Range<Int>] = []
                let event = buffer.withUnsafeBytes { bytes in
                    decoded ? reader.next(bytes) { payload.append($0) } : reader.next(bytes)
                }
                switch event {
                case .needMore:
                    continue feeding
                case .interim(let head, let length):
                    seen.events.append("interim \(head.status)")
                    buffer.removeFirst(length)
                case .head(let head, let length):
                    seen.events.append("head \(head.status)")
                    buffer.removeFirst(length)
                case .body(let count):
                    if decoded {
                        for range in payload { seen.body += buffer[range] }
                    } else {
                        seen.body += buffer[..<count]
                    }
                    buffer.removeFirst(count)
                case .complete(let reusable):
                    seen.events.append(reusable ? "complete reusable" : "complete")
                    return seen
                case .failed(let failure):
                    seen.events.append("failed \(failure)")
                    return seen
                case .unexpectedBytes:
                    seen.events.append("unexpected")
                    return seen
                }
            }
        }
        if close { seen.events.append("closed \(reader.upstreamClosed())") }
        return seen
    }

    /// Every way of cutting `bytes` in two.
    static func everySplit(_ bytes: [UInt8]) -> [[[UInt8]]] {
        (0...bytes.count).map { [Array(bytes[..<$0]), Array(bytes[$0...])] }
    }

    @Test func contentLengthBodyAtEverySplit() {
        let response = Array("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello".utf8)
        for chunks in Self.everySplit(response) {
            #expect(Self.read(chunks) == Seen(events: ["head 200", "complete reusable"], body: Array("hello".utf8)), "\(chunks.map(\.count))")
        }
    }

    @Test func chunkedBodyAtEverySplitRawAndDecoded() {
        let body = "5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
        let response = Array("HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n\(body)".utf8)
        for chunks in Self.everySplit(response) {
            #expect(Self.read(chunks) == Seen(events: ["head 201", "complete reusable"], body: Array(body.utf8)))
            #expect(Self.read(chunks, decoded: true) == Seen(events: ["head 201", "complete reusable"], body: Array("hello world".utf8)))
        }
    }

    @Test func interimResponsesComeBeforeTheFinalHead() {
        let response = Array("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".utf8)
        #expect(Self.read([response]) == Seen(events: ["interim 100", "interim 103", "head 200", "complete reusable"], body: Array("ok".utf8)))
    }

    @Test func responsesWithoutBody() {
        #expect(Self.read([Array("HTTP/1.1 204 No Content\r\n\r\n".utf8)]).events == ["head 204", "complete reusable"])
        #expect(Self.read([Array("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n".utf8)], requestWasHEAD: true).events
            == ["head 200", "complete reusable"])
        #expect(Self.read([Array("HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n".utf8)]).events == ["head 304", "complete"])
    }

    @Test func bytesBeyondTheResponseMakeTheConnectionUnusable() {
        let seen = Self.read([Array("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA".utf8)])
        #expect(seen == Seen(events: ["head 200", "complete"], body: Array("ok".utf8)))
    }

    @Test func closeDelimitedBodyEndsWhenTheUpstreamCloses() {
        let seen = Self.read([Array("HTTP/1.1 200 OK\r\n\r\nsome".utf8), Array(" more".utf8)], close: true)
        #expect(seen == Seen(events: ["head 200", "closed complete"], body: Array("some more".utf8)))
    }

    @Test func upstreamClosingEarly() {
        #expect(Self.read([Array("HTTP/1.1 200 OK\r\nContent-Le".utf8)], close: true).events == ["closed beforeHead"])
        #expect(Self.read([Array("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc".utf8)], close: true).events
            == ["head 200", "closed midBody"])
        var idle = ResponseReader()
        #expect(idle.upstreamClosed() == .idle)
    }

    @Test func badResponsesFail() {
        #expect(Self.read([Array("SMTP ready\r\n\r\n".utf8)]).events == ["failed malformedHead"])
        #expect(Self.read([Array("HTTP/1.1 200 OK\r\nX: \(String(repeating: "a", count: 70_000))".utf8)]).events == ["failed headTooLarge"])
        #expect(Self.read([Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".utf8)]).events
            == ["head 200", "failed malformedChunkedBody"])
        #expect(ResponseReader.Failure.malformedHead.message(from: "instance") == "instance sent a malformed response head")
    }

    @Test func bytesWhileIdleAreUnexpected() {
        var reader = ResponseReader()
        let event = Array("HTTP/1.1 200 OK\r\n\r\n".utf8).withUnsafeBytes { reader.next($0) }
        guard case .unexpectedBytes = event else { Issue.record("\(event)"); return }
        let nothing = [UInt8]().withUnsafeBytes { reader.next($0) }
        guard case .needMore = nothing else { Issue.record("\(nothing)"); return }
    }

    @Test func oneReaderServesConsecutiveExchanges() {
        var reader = ResponseReader()
        for round in 1...3 {
            reader.begin(requestWasHEAD: false)
            var bytes = Array("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n\(round)".utf8)
            var events: [String] = []
            loop: while true {
                let event = bytes.withUnsafeBytes { reader.next($0) }
                switch event {
                case .head(_, let length): events.append("head"); bytes.removeFirst(length)
                case .body(let count): events.append("body \(count)"); bytes.removeFirst(count)
                case .complete(let reusable): events.append("complete \(reusable)"); break loop
                default: events.append("\(event)"); break loop
                }
            }
            #expect(events == ["head", "body 1", "complete true"] && reader.isIdle)
        }
    }
}

extension ResponseReaderTests {
    @Test func decodedPayloadCoversEveryFraming() {
        let length = Array("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".utf8)
        let untilClose = Array("HTTP/1.0 200 OK\r\n\r\nhello".utf8)
        for chunks in Self.everySplit(length) {
            #expect(Self.read(chunks, decoded: true) == Seen(events: ["head 200", "complete reusable"], body: Array("hello".utf8)))
        }
        #expect(Self.read([untilClose], close: true, decoded: true) == Seen(events: ["head 200", "closed complete"], body: Array("hello".utf8)))
    }
}

@Suite("request framing headers")
struct RequestFramingTests {
    /// Feeds `lines` ("Name: value") through `RequestFraming.take`, as a head reader does.
    func take(_ lines: [String], host: String? = nil) -> (RequestFraming, kept: [String], notFraming: [String]) {
        var framing = RequestFraming(host: host)
        var kept: [String] = [], others: [String] = []
        for line in lines {
            let bytes = Array(line.utf8)
            let colon = bytes.firstIndex(of: UInt8(ascii: ":"))!
            bytes.withUnsafeBytes { raw in
                switch framing.take(raw, name: 0..<colon, value: (colon + 2)..<bytes.count) {
                case nil: others.append(line)
                case true?: kept.append(line)
                case false?: break
                }
            }
        }
        return (framing, kept, others)
    }

    @Test func framingHeadersAreReadAndHopByHopOnesDropped() throws {
        let (framing, kept, others) = take([
            "Host: a.example:8080", "Content-Length: 5", "Connection: keep-alive, Upgrade", "Upgrade: h2c",
            "HTTP2-Settings: AAA", "Expect: 100-continue", "Keep-Alive: timeout=5", "Proxy-Connection: x", "TE: trailers",
            "X-Other: 1",
        ])
        #expect(kept == ["Host: a.example:8080", "Content-Length: 5"])
        #expect(others == ["X-Other: 1"])
        #expect(framing.host == "a.example:8080" && framing.expectContinue && framing.connectionKeepAlive)
        #expect(framing.connectionUpgrade && framing.upgradeOffersH2C && framing.hasHTTP2Settings)
        #expect(framing.failure == nil)
        guard case .length(remaining: 5) = try framing.bodyFraming() else { Issue.record("not a 5-byte body"); return }
        #expect(framing.keepAlive(isHTTP10: true) && framing.keepAlive(isHTTP10: false))
        // The request line's authority wins over Host.
        #expect(take(["Host: b"], host: "a").0.host == "a")
    }

    @Test func malformedOrConflictingFramingIsRefused() {
        #expect(take(["Content-Length: 5", "Content-Length: 6"]).0.failure?.status == 400)
        #expect(take(["Content-Length: x"]).0.failure?.status == 400)
        #expect(take(["Transfer-Encoding: gzip"]).0.failure?.status == 501)
        let both = take(["Content-Length: 5", "Transfer-Encoding: chunked"]).0
        #expect(throws: HTTPHeadError.self) { try both.bodyFraming() }
        let big = take(["Content-Length: 100"]).0
        do {
            _ = try big.bodyFraming(maxBody: 10)
            Issue.record("a body past maxBody was accepted")
        } catch {
            #expect(error.status == 413)
        }
        let closed = take(["Connection: close"]).0
        #expect(!closed.keepAlive(isHTTP10: false))
        #expect(!take([]).0.keepAlive(isHTTP10: true), "HTTP/1.0 closes without Connection: keep-alive")
    }
}
