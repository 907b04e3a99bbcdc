import ApusCore
import NIOCore
import NIOHPACK
import Testing

@testable import ApusGateway
import ApusWire

@Suite("gRPC wire pieces")
struct GRPCWireTests {
    @Test(arguments: [
        ("100m", Duration.milliseconds(100)), ("1S", .seconds(1)), ("2H", .seconds(7200)), ("3M", .seconds(180)),
        ("5u", .microseconds(5)), ("7n", .nanoseconds(7)), ("99999999m", .milliseconds(99_999_999)),
    ])
    func timeoutParses(text: String, expected: Duration) {
        #expect(GRPCWire.parseTimeout(text) == expected)
    }

    @Test(arguments: ["", "m", "123456789m", "10x", "-1m", "1.5S", "S1"])
    func malformedTimeoutIsRefused(text: String) {
        #expect(GRPCWire.parseTimeout(text) == nil)
    }

    @Test func timeoutFormatsWithinEightDigits() {
        #expect(GRPCWire.formatTimeout(.milliseconds(250)) == "250m")
        #expect(GRPCWire.formatTimeout(.nanoseconds(10)) == "1m", "never 0: that would mean expired")
        #expect(GRPCWire.formatTimeout(.seconds(200_000)) == "200000S")
        for duration in [Duration.milliseconds(1), .seconds(30), .seconds(3600 * 24 * 30)] {
            let text = GRPCWire.formatTimeout(duration)
            #expect(text.utf8.count <= 9)
            #expect(GRPCWire.parseTimeout(text) == duration)
        }
    }

    @Test func messagesArePercentEncoded() {
        #expect(GRPCWire.percentEncode("plain text: ok") == "plain text: ok")
        #expect(GRPCWire.percentEncode("100%") == "100%25")
        #expect(GRPCWire.percentEncode("nope ✓") == "nope %E2%9C%93")
        #expect(GRPCWire.percentEncode("a\nb") == "a%0Ab")
    }

    @Test func trailersOnlyCarriesStatusAndHTTP200() {
        let headers = GRPCWire.trailersOnly(status: 12, message: "unknown service x.Y")
        #expect(headers.first(name: ":status") == "200")
        #expect(headers.first(name: "content-type") == "application/grpc")
        #expect(headers.first(name: "grpc-status") == "12")
        #expect(headers.first(name: "grpc-message") == "unknown service x.Y")
        #expect(GRPCWire.trailers(status: 0, message: "").first(name: "grpc-message") == nil)
    }

    @Test func neutralErrorsMapToGRPCStatus() {
        #expect(GRPCWire.status(for: ApusError(.overloaded, "")) == 8)
        #expect(GRPCWire.status(for: ApusError(.deadlineExceeded, "")) == 4)
        #expect(GRPCWire.status(for: ApusError(.unavailable, "")) == 14)
        #expect(GRPCWire.status(for: ApusError(.instanceError, "")) == 14)
        #expect(GRPCWire.status(for: ApusError(.internal, "")) == 13)
        #expect(GRPCWire.status(for: ApusError(.badRequest, "")) == 3)
        #expect(GRPCWire.status(for: ApusError(.wrongProtocol, "")) == 12)
        #expect(GRPCWire.status(for: ApusError(.unauthenticated, "")) == 16)
        #expect(GRPCWire.status(for: ApusError(.tooLarge, "")) == 8)
    }

    @Test func messageFramesRoundTrip() throws {
        let frame = GRPCWire.frameMessage([1, 2, 3], allocator: ByteBufferAllocator())
        #expect(Array(frame.readableBytesView) == [0, 0, 0, 0, 3, 1, 2, 3])
        #expect(try GRPCWire.firstMessage(in: frame) == [1, 2, 3])
        #expect(try GRPCWire.firstMessage(in: frame.getSlice(at: 0, length: 6)!) == nil, "incomplete")
        var compressed = frame
        compressed.setInteger(UInt8(1), at: 0)
        #expect(throws: GRPCWire.CompressedMessage.self) { try GRPCWire.firstMessage(in: compressed) }
        #expect(throws: ApusError.self) { try GRPCWire.firstRequestMessage(in: compressed) }
    }

    @Test func pathsSplitIntoServiceAndMethod() throws {
        let (service, method) = try GRPCEdgeStream.splitPath("/echo.v1.Echo/Get")
        #expect(service == "echo.v1.Echo" && method == "Get")
        for bad in ["", "/", "/echo.Echo", "/echo.Echo/", "//Get", "echo.Echo/Get", "/a/b/c"] {
            #expect(throws: ApusError.self, "\(bad)") { try GRPCEdgeStream.splitPath(bad) }
        }
    }
}

@Suite("gRPC health request")
struct GRPCHealthTests {
    @Test func serviceNameIsReadFromFieldOne() throws {
        #expect(try GRPCHealthStream.decodeServiceName([]) == "")
        #expect(try GRPCHealthStream.decodeServiceName([0x0A, 6] + Array("echo.E".utf8)) == "echo.E")
        // Unknown varint field 2 before it is skipped.
        #expect(try GRPCHealthStream.decodeServiceName([0x10, 0x96, 0x01, 0x0A, 1, 0x41]) == "A")
    }

    @Test func malformedRequestsAreRefused() {
        #expect(throws: ApusError.self) { try GRPCHealthStream.decodeServiceName([0x0A, 5, 0x41]) }
        #expect(throws: ApusError.self) { try GRPCHealthStream.decodeServiceName([0x0A]) }
        #expect(throws: ApusError.self) { try GRPCHealthStream.decodeServiceName([0x0B]) }
    }
}

@Suite("h2c upgrade")
struct H2CUpgradeTests {
    @Test func stream1HeadersFrameDecodesToTheRequest() throws {
        let longValue = String(repeating: "v", count: 300)
        let fields = [(":method", "GET"), (":scheme", "http"), (":path", "/f/x"), (":authority", "h"), ("accept", "*/*"), ("x-long", longValue)]
        var frame = try #require(H2CUpgradeSplicer.headersFrame(fields, allocator: ByteBufferAllocator()))
        let length = Int(frame.readInteger(as: UInt32.self)! >> 8)
        frame.moveReaderIndex(to: 3)
        #expect(frame.readInteger(as: UInt8.self) == 1, "type HEADERS")
        #expect(frame.readInteger(as: UInt8.self) == 5, "END_STREAM | END_HEADERS")
        #expect(frame.readInteger(as: UInt32.self) == 1, "stream 1")
        #expect(frame.readableBytes == length)
        #expect(frame.getInteger(at: frame.readerIndex, as: UInt8.self) == 0, "literal without indexing: the peer's table stays empty")
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        let headers = try decoder.decodeHeaders(from: &frame)
        #expect(headers.map { ($0.name, $0.value) }.elementsEqual(fields, by: { $0 == $1 }))
    }

    @Test func oversizedHeadIsNotUpgraded() {
        let fields = [(":method", "GET"), ("x-big", String(repeating: "a", count: 20_000))]
        #expect(H2CUpgradeSplicer.headersFrame(fields, allocator: ByteBufferAllocator()) == nil)
    }
}

@Suite("gateway protobuf")
struct ProtobufWriterTests {
    @Test func writtenFieldsReadBack() {
        var inner = ProtobufWriter()
        inner.bytes(1, Array("echo.Echo".utf8))
        var message = ProtobufWriter()
        message.varint(1, 300)
        message.bytes(6, inner.output)
        let fields = ProtobufWriter.topLevelFields(message.output)
        #expect(fields.map(\.number) == [1, 6])
        #expect(fields[0].bytes == nil)
        #expect(fields[1].bytes == inner.output)
        #expect(ProtobufWriter.topLevelFields(fields[1].bytes!).first?.bytes == Array("echo.Echo".utf8))
        // A truncated length-delimited field ends parsing instead of reading past the end.
        #expect(ProtobufWriter.topLevelFields([0x3A, 0x05, 0x41]).isEmpty)
    }
}

@Suite("First bytes of a plaintext connection")
struct FirstBytesTests {
    @Test(arguments: [
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", EdgePipeline.FirstBytes.http2),
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\u{0}\u{0}\u{0}\u{4}", .http2),
        ("", .undecided),
        ("PRI * HT", .undecided),
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r", .undecided),
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\rQ", .invalidPreface),
        ("PRI * HTTP/2.0\r\n\r\n", .undecided),
        ("PRI * HTTP/2.0\r\nHost: x\r\n\r\n", .invalidPreface),
        ("PRI * HTTP/2.1\r\n\r\nSM\r\n\r\n", .invalidPreface),
        ("PRI * HTTP/1.1\r\n\r\n", .http1),
        ("INVALID CONNECTION PREFACE\r\n\r\n", .http1),
        ("GET / HTTP/1.1\r\n\r\n", .http1),
        ("P", .undecided),
        ("PUT / HTTP/1.1\r\n", .http1),
    ])
    func sniffs(bytes: String, expected: EdgePipeline.FirstBytes) {
        #expect(EdgePipeline.sniff(Array(bytes.utf8)) == expected)
    }

    @Test func invalidPrefaceReplyIsSettingsThenGoawayProtocolError() {
        var reply = EdgePipeline.invalidPrefaceReply(allocator: ByteBufferAllocator())
        // SETTINGS: empty, stream 0.
        #expect(reply.readBytes(length: 9) == [0, 0, 0, 0x4, 0, 0, 0, 0, 0])
        // GOAWAY header, then last stream 0 and error code 1 (PROTOCOL_ERROR).
        let header = reply.readBytes(length: 9)!
        let length = Int(header[0]) << 16 | Int(header[1]) << 8 | Int(header[2])
        #expect(header[3] == 0x7 && header[4] == 0)
        #expect(Array(header[5...]) == [0, 0, 0, 0])
        #expect(reply.readableBytes == length)
        #expect(reply.readInteger(as: UInt32.self) == 0)
        #expect(reply.readInteger(as: UInt32.self) == 1)
        #expect(reply.readString(length: reply.readableBytes) == "invalid connection preface")
    }
}
