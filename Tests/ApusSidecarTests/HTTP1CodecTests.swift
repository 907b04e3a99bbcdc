import ApusWire
import NIOCore
import Testing
@testable import ApusSidecarCore

@Suite("HTTP/1.1 codec")
struct SidecarHTTP1CodecTests {
    func parse(_ text: String, dropCaller: Bool = true) throws -> (ProxyRequestHead, String) {
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBytes { raw in
            let end = HTTPBytes.endOfHead(raw)!
            let head = try ProxyRequestHead.parse(raw, headEnd: end, dropCaller: dropCaller)
            var kept = ByteBuffer()
            head.keptSpans.write(from: raw, to: &kept)
            return (head, String(buffer: kept))
        }
    }

    @Test("reads what routing needs and keeps every other header line byte for byte")
    func request() throws {
        let (head, kept) = try parse(
            "POST /pay?x=1 HTTP/1.1\r\nHost: payments:15001\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
                + "traceparent: 00-abc-def-01\r\nX-Request-Id: r1\r\nX-Apus-Deadline-Ms: 1700000000000\r\n"
                + "x-apus-caller: spoofed\r\nX-Custom:  v \r\n\r\nhello")
        #expect(head.method == "POST")
        #expect(head.target == "/pay?x=1")
        #expect(head.host == "payments")
        #expect(head.keepAlive)
        #expect(head.hasTraceparent)
        #expect(head.requestID == "r1")
        #expect(head.deadlineEpochMs == 1_700_000_000_000)
        #expect(head.caller == "spoofed")
        if case .length(let n) = head.framing { #expect(n == 5) } else { Issue.record("expected a length") }
        // The request line, Connection, the deadline (re-sent by the sidecar) and, outbound, x-apus-caller go.
        #expect(kept == "Host: payments:15001\r\nContent-Length: 5\r\ntraceparent: 00-abc-def-01\r\nX-Request-Id: r1\r\nX-Custom:  v \r\n")
        let (inbound, keptInbound) = try parse("GET / HTTP/1.1\r\nx-apus-caller: svc-a\r\n\r\n", dropCaller: false)
        #expect(inbound.caller == "svc-a" && keptInbound == "x-apus-caller: svc-a\r\n")
    }

    @Test("absolute-form targets name the upstream; HTTP/1.0 closes by default; chunked bodies")
    func forms() throws {
        let (absolute, _) = try parse("GET http://inventory/items/1 HTTP/1.1\r\n\r\n")
        #expect(absolute.host == "inventory" && absolute.target == "/items/1")
        let (old, _) = try parse("GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        #expect(!old.keepAlive && old.isHTTP10)
        let (chunked, _) = try parse("PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        if case .chunked = chunked.framing {} else { Issue.record("expected chunked framing") }
    }

    @Test("malformed heads are refused with a status", arguments: [
        ("GET /\r\n\r\n", 400),
        ("GET / HTTP/2.0\r\n\r\n", 505),
        ("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nbad line\r\n\r\n", 400),
    ])
    func malformed(text: String, status: Int) {
        #expect {
            _ = try parse(text)
        } throws: { error in
            (error as? ProxyRequestHead.ParseError)?.status == status
        }
    }

    @Test("response heads: framing, and hop-by-hop lines dropped")
    func response() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\nX-A: b\r\n\r\n"
        let bytes = Array(text.utf8)
        bytes.withUnsafeBytes { raw in
            let head = ResponseHead.parse(raw, headEnd: HTTPBytes.endOfHead(raw)!, requestWasHEAD: false)!
            #expect(head.status == 200 && head.connectionClose)
            if case .length(let n) = head.framing { #expect(n == 3) } else { Issue.record("expected a length") }
            var kept = ByteBuffer()
            head.keptSpans.write(from: raw, to: &kept)
            #expect(String(buffer: kept) == "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n")
            let asHEAD = ResponseHead.parse(raw, headEnd: HTTPBytes.endOfHead(raw)!, requestWasHEAD: true)!
            if case .none = asHEAD.framing {} else { Issue.record("a HEAD response has no body") }
        }
    }

    @Test("the chunked scanner finds the end and the payload, fed byte by byte")
    func chunked() throws {
        let body = Array("5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT".utf8)
        var scanner = ChunkedBodyScanner()
        var payload: [UInt8] = []
        var consumed = 0
        for byte in body where !scanner.isDone {
            let n = try [byte].withUnsafeBytes { raw in
                try scanner.scan(raw) { range in payload += raw[range] }
            }
            consumed += n
        }
        #expect(scanner.isDone)
        #expect(String(decoding: payload, as: UTF8.self) == "hello world")
        #expect(consumed == body.count - 4)
        var bad = ChunkedBodyScanner()
        #expect(throws: ChunkedBodyScanner.ScanError.self) {
            _ = try Array("zz\r\n".utf8).withUnsafeBytes { raw throws(ChunkedBodyScanner.ScanError) in try bad.scan(raw) }
        }
    }

    @Test("decimal writer")
    func decimal() {
        var buffer = ByteBuffer()
        for value in [0, 7, 42, 1_700_000_000_123] {
            buffer.clear()
            buffer.writeDecimal(value)
            #expect(String(buffer: buffer) == String(value))
        }
    }
}
