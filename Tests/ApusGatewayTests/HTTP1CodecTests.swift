import ApusCore
import NIOCore
import Testing

@testable import ApusGateway

@Suite("gateway routing")
struct GatewayRouteTests {
    @Test func pathPrefixRouting() throws {
        #expect(try GatewayRoute.resolve(host: "127.0.0.1:8080", uri: "/orders/items/3?x=1", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/items/3?x=1", forwardedPrefix: "/orders"))
        #expect(try GatewayRoute.resolve(host: nil, uri: "/orders", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/", forwardedPrefix: "/orders"))
        #expect(try GatewayRoute.resolve(host: nil, uri: "/orders?x=1", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/?x=1", forwardedPrefix: "/orders"))
    }

    @Test func hostRouting() throws {
        #expect(try GatewayRoute.resolve(host: "Orders.APUS.localhost:8080", uri: "/a/b", domain: "apus.localhost")
            == GatewayRoute(function: "orders", instancePath: "/a/b", forwardedPrefix: nil))
        // Not one label under the domain: falls back to the path.
        #expect(try GatewayRoute.resolve(host: "a.b.apus.localhost", uri: "/f/x", domain: "apus.localhost").function == "f")
        #expect(try GatewayRoute.resolve(host: "apus.localhost", uri: "/f/x", domain: "apus.localhost").function == "f")
        #expect(try GatewayRoute.resolve(host: "xapus.localhost", uri: "/f/x", domain: "apus.localhost").function == "f")
    }

    @Test func badTargets() {
        #expect(throws: ApusError.self) { try GatewayRoute.resolve(host: nil, uri: "/", domain: "d") }
        #expect(throws: ApusError.self) { try GatewayRoute.resolve(host: nil, uri: "*", domain: "d") }
    }
}

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
