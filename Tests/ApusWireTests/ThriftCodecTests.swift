import NIOCore
import NIOTestUtils
import Testing

@testable import ApusWire

/// Builds Thrift messages byte by byte (binary and compact), independent of the code under test.
private enum Bytes {
    static func binaryCall(_ name: String, seqid: Int32, strict: Bool = true, args: [UInt8]) -> ByteBuffer {
        var out = ByteBuffer()
        if strict {
            out.writeInteger(UInt32(0x8001_0001))
            out.writeInteger(Int32(name.utf8.count)); out.writeString(name)
            out.writeInteger(seqid)
        } else {
            out.writeInteger(Int32(name.utf8.count)); out.writeString(name)
            out.writeInteger(UInt8(1)); out.writeInteger(seqid)
        }
        out.writeBytes(args)
        return out
    }

    /// Binary struct: {1: string "hi", 2: i32 7, 3: list<i64> [1, 2], 4: map<string,i32> {"a": 1},
    /// 5: struct {1: bool true, 2: double 1.5}, 6: set<string> {}}, then the args struct's STOP.
    static let binaryArgs: [UInt8] = [
        11, 0, 1, 0, 0, 0, 2, 0x68, 0x69,
        8, 0, 2, 0, 0, 0, 7,
        15, 0, 3, 10, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2,
        13, 0, 4, 11, 8, 0, 0, 0, 1, 0, 0, 0, 1, 0x61, 0, 0, 0, 1,
        12, 0, 5, 2, 0, 1, 1, 4, 0, 2, 0x3F, 0xF8, 0, 0, 0, 0, 0, 0, 0,
        14, 0, 6, 11, 0, 0, 0, 0,
        0,
    ]

    static func compactCall(_ name: String, seqid: UInt8, args: [UInt8]) -> ByteBuffer {
        var out = ByteBuffer()
        out.writeBytes([0x82, 0x21, seqid, UInt8(name.utf8.count)])
        out.writeString(name)
        out.writeBytes(args)
        return out
    }

    /// Compact struct: {1: string "hi", 2: i32 -1 (zigzag 1), 3: list<i64> [1, 2], 4: bool true,
    /// 5: map<string,i32> {"a": 1}, 6: struct {1: double 1.5}, 20: i16 3 (long-form id)}, STOP.
    static let compactArgs: [UInt8] = [
        0x18, 2, 0x68, 0x69,
        0x15, 1,
        0x19, 0x26, 2, 4,
        0x11,
        0x1B, 1, 0x85, 1, 0x61, 2,
        0x1C, 0x17, 0x3F, 0xF8, 0, 0, 0, 0, 0, 0, 0,
        0x04, 0x28, 6,
        0,
    ]
}

@Suite("thrift messages")
struct ThriftWireTests {
    @Test func binaryEnvelopesBothForms() throws {
        for strict in [true, false] {
            let message = Bytes.binaryCall("add", seqid: 42, strict: strict, args: Bytes.binaryArgs)
            var cursor = ThriftWire.Cursor(message)
            let envelope = try ThriftWire.readEnvelope(&cursor)
            #expect(envelope.name == "add" && envelope.seqid == 42 && envelope.type == .call)
            #expect(envelope.encoding == .binary && envelope.oldBinary == !strict)
            #expect(try ThriftWire.messageLength(message, at: 0) == message.readableBytes)
        }
    }

    @Test func compactEnvelopeAndSkipping() throws {
        let message = Bytes.compactCall("greet", seqid: 9, args: Bytes.compactArgs)
        var cursor = ThriftWire.Cursor(message)
        let envelope = try ThriftWire.readEnvelope(&cursor)
        #expect(envelope == .init(name: "greet", type: .call, seqid: 9, encoding: .compact, length: 9))
        #expect(try ThriftWire.messageLength(message, at: 0) == message.readableBytes)
    }

    @Test func everyTruncationIsIncompleteNotAnError() throws {
        for message in [Bytes.binaryCall("add", seqid: 1, args: Bytes.binaryArgs), Bytes.compactCall("g", seqid: 1, args: Bytes.compactArgs)] {
            for cut in 0..<message.readableBytes {
                #expect(throws: ThriftWire.ScanError.incomplete) { try ThriftWire.messageLength(message.getSlice(at: 0, length: cut)!, at: 0) }
            }
        }
    }

    /// A scan resumed piece by piece finds the same length as one over the whole message, at every split, and
    /// never reports a length before the message is whole.
    @Test func resumedScansAgreeWithWholeOnesAtEverySplit() throws {
        for message in [Bytes.binaryCall("add", seqid: 1, args: Bytes.binaryArgs), Bytes.binaryCall("add", seqid: 1, strict: false, args: Bytes.binaryArgs),
                        Bytes.compactCall("g", seqid: 1, args: Bytes.compactArgs)] {
            for piece in 1...7 {
                var scan = ThriftWire.MessageScan()
                var length: Int?
                var available = 0
                while length == nil {
                    available = min(available + piece, message.readableBytes)
                    do throws(ThriftWire.ScanError) {
                        length = try ThriftWire.messageLength(message.getSlice(at: 0, length: available)!, at: 0, resuming: &scan)
                    } catch {
                        #expect(error == .incomplete)
                        #expect(available < message.readableBytes)
                        #expect(scan.committed <= available)
                    }
                }
                #expect(length == message.readableBytes && available == message.readableBytes, "piece \(piece)")
            }
        }
    }

    /// A large message trickled in small pieces is read once: each piece advances the committed part, so the next
    /// read starts where the last one stopped instead of at the message's start.
    @Test func aTrickledMessageIsNotRescannedFromItsStart() throws {
        // {1: list<string> of 2000 strings of 100 bytes}, STOP: about 208 KB.
        var args: [UInt8] = [15, 0, 1, 11] + withUnsafeBytes(of: Int32(2000).bigEndian, Array.init)
        for _ in 0..<2000 { args += withUnsafeBytes(of: Int32(100).bigEndian, Array.init) + Array(repeating: 0x61, count: 100) }
        args.append(0)
        let message = Bytes.binaryCall("put", seqid: 3, args: args)
        var scan = ThriftWire.MessageScan()
        var previous = 0
        var available = 0
        var length: Int?
        while length == nil {
            available = min(available + 2048, message.readableBytes)
            do throws(ThriftWire.ScanError) {
                length = try ThriftWire.messageLength(message.getSlice(at: 0, length: available)!, at: 0, resuming: &scan)
            } catch {
                #expect(error == .incomplete)
                // Everything but at most one unfinished element (4 + 100 bytes) is committed.
                #expect(scan.committed > previous && available - scan.committed < 104 + 16)
                previous = scan.committed
            }
        }
        #expect(length == message.readableBytes)
    }

    @Test func theDecoderKeepsItsScanAcrossReads() throws {
        let message = Bytes.compactCall("g", seqid: 1, args: Bytes.compactArgs)
        var decoder = ThriftFrameDecoder(maxFrameSize: 1 << 20)
        var buffer = ByteBuffer()
        var frames: [ThriftFrame] = []
        for byte in message.readableBytesView {
            buffer.writeInteger(byte)
            if let frame = try ThriftFrameDecoder.nextFrame(&buffer, maxFrameSize: 1 << 20, expected: nil, scan: &decoder.scan) {
                frames.append(frame)
            }
        }
        #expect(frames.count == 1 && frames.first?.message.readableBytes == message.readableBytes)
        #expect(decoder.scan.committed == 0, "reset for the next message")
    }

    @Test func unknownTypesAndBadVersionsAreMalformed() {
        let badType = Bytes.binaryCall("add", seqid: 1, args: [99, 0, 1, 0])
        #expect(throws: ThriftWire.ScanError.malformed("unknown binary field type 99")) { try ThriftWire.messageLength(badType, at: 0) }
        var badVersion = ByteBuffer()
        badVersion.writeInteger(UInt32(0x8002_0001))
        #expect(throws: ThriftWire.ScanError.self) { try ThriftWire.messageLength(badVersion, at: 0) }
        // Deep nesting is refused instead of recursing without bound.
        let deep = Bytes.binaryCall("x", seqid: 1, args: Array(repeating: [12, 0, 1], count: 100).flatMap { $0 })
        #expect(throws: ThriftWire.ScanError.malformed("nesting deeper than 64")) { try ThriftWire.messageLength(deep, at: 0) }
    }

    @Test func renamingKeepsTheRestOfTheMessage() throws {
        for message in [Bytes.binaryCall("Calculator:add", seqid: 5, args: Bytes.binaryArgs),
                        Bytes.compactCall("Calculator:add", seqid: 5, args: Bytes.compactArgs)] {
            var cursor = ThriftWire.Cursor(message)
            let envelope = try ThriftWire.readEnvelope(&cursor)
            let renamed = ThriftWire.renamed(message, envelope: envelope, to: "add")
            var again = ThriftWire.Cursor(renamed)
            let renamedEnvelope = try ThriftWire.readEnvelope(&again)
            #expect(renamedEnvelope.name == "add" && renamedEnvelope.seqid == 5)
            #expect(renamed.readableBytes == message.readableBytes - "Calculator:".utf8.count)
            #expect(try ThriftWire.messageLength(renamed, at: 0) == renamed.readableBytes)
        }
    }

    @Test func applicationExceptionsAreWellFormedReplies() throws {
        for encoding in [ThriftWire.Encoding.binary, .compact] {
            let reply = ThriftWire.applicationException(name: "add", seqid: 3, encoding: encoding, error: .unknownMethod, message: "no such method")
            var cursor = ThriftWire.Cursor(reply)
            let envelope = try ThriftWire.readEnvelope(&cursor)
            #expect(envelope.type == .exception && envelope.seqid == 3 && envelope.encoding == encoding)
            #expect(try ThriftWire.messageLength(reply, at: 0) == reply.readableBytes)
        }
        let binary = ThriftWire.applicationException(name: "m", seqid: 1, encoding: .binary, error: .internalError, message: "x")
        // ... envelope (4 + 4 + 1 + 4), then {1: "x"} and {2: 6}.
        #expect(Array(binary.readableBytesView.dropFirst(13)) == [11, 0, 1, 0, 0, 0, 1, 0x78, 8, 0, 2, 0, 0, 0, 6, 0])
    }
}

@Suite("thrift transports")
struct ThriftFramingTests {
    static let allocator = ByteBufferAllocator()

    func frame(_ message: ByteBuffer, _ transport: ThriftTransport, headers: [(String, String)] = [], intHeaders: [(UInt16, String)] = [],
               seqid: Int32 = 0) throws -> (ByteBuffer, ThriftFrame) {
        var cursor = ThriftWire.Cursor(message)
        let envelope = try ThriftWire.readEnvelope(&cursor)
        let bytes = ThriftFraming.encode(message, transport: transport, encoding: envelope.encoding, headerSeqid: seqid,
                                         headers: headers, intHeaders: intHeaders, allocator: Self.allocator)
        let expected = ThriftFrame(transport: transport, envelope: envelope, message: message, headerSeqid: seqid,
                                   headers: Dictionary(uniqueKeysWithValues: headers), intHeaders: Dictionary(uniqueKeysWithValues: intHeaders))
        return (bytes, expected)
    }

    @Test func decoderSplitsEveryTransportAtAnyByteBoundary() throws {
        let binary = Bytes.binaryCall("add", seqid: 1, args: Bytes.binaryArgs)
        let old = Bytes.binaryCall("add", seqid: 2, strict: false, args: Bytes.binaryArgs)
        let compact = Bytes.compactCall("greet", seqid: 3, args: Bytes.compactArgs)
        let pairs: [(ByteBuffer, [ThriftFrame])] = try [
            frame(binary, .framed), frame(binary, .buffered), frame(old, .buffered), frame(old, .framed),
            frame(compact, .framed), frame(compact, .buffered),
            frame(binary, .theader, headers: [("apus-function", "calc"), ("client_timeout", "250")], seqid: 77),
            frame(compact, .theader),
            frame(binary, .ttheader, headers: [("k", "v")], intHeaders: [(6, "Calculator"), (12, "100")], seqid: 5),
            frame(compact, .ttheader, intHeaders: [(9, "greet")]),
        ].map { ($0.0, [$0.1]) }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            ThriftFrameDecoder(maxFrameSize: 1 << 20)
        }
    }

    @Test func oversizedAndMalformedFramesAreRefused() throws {
        var huge = ByteBuffer()
        huge.writeInteger(UInt32(64 << 20))
        huge.writeBytes([0x80, 0x01, 0, 1])
        #expect(throws: ThriftDecodingError.self) { try ThriftFrameDecoder.nextFrame(&huge, maxFrameSize: 16 << 20, expected: nil) }
        var garbage = ByteBuffer(string: "GET / HTTP/1.1\r\n\r\n")
        #expect(throws: ThriftDecodingError.self) { try ThriftFrameDecoder.nextFrame(&garbage, maxFrameSize: 16 << 20, expected: nil) }
        // A THeader frame asking for a zlib transform is refused (the payload would be compressed).
        var zlib = ByteBuffer()
        zlib.writeInteger(UInt32(14 + 4))
        zlib.writeInteger(UInt16(0x0FFF)); zlib.writeInteger(UInt16(0)); zlib.writeInteger(Int32(1)); zlib.writeInteger(UInt16(1))
        zlib.writeBytes([0, 1, 1, 0])
        zlib.writeBytes([0x80, 0x01, 0, 1])
        #expect(throws: ThriftDecodingError.self) { try ThriftFrameDecoder.nextFrame(&zlib, maxFrameSize: 1 << 20, expected: nil) }
    }

    @Test func instanceSideReadsItsDeclaredTransport() throws {
        let reply = ThriftWire.applicationException(name: "add", seqid: 1, encoding: .binary, error: .internalError, message: "m")
        var bytes = ThriftFraming.encode(reply, transport: .buffered, encoding: .binary, allocator: Self.allocator)
        let frame = try #require(try ThriftFrameDecoder.nextFrame(&bytes, maxFrameSize: 1 << 20, expected: .buffered))
        #expect(frame.envelope.type == .exception && bytes.readableBytes == 0)
    }
}

@Suite("thrift buffered bytes budget")
struct BufferedBytesBudgetTests {
    @Test func growthPastTheLimitIsRefusedAndChangesNothing() {
        let budget = BufferedBytesBudget(limit: 1000)
        #expect(budget.update(from: 0, to: 600))
        #expect(!budget.update(from: 0, to: 500))
        #expect(budget.current == 600)
        #expect(budget.update(from: 600, to: 900))
        #expect(budget.update(from: 0, to: 100))
        #expect(budget.current == 1000)
        #expect(budget.update(from: 900, to: 0))
        #expect(budget.update(from: 0, to: 800))
        #expect(budget.current == 900)
    }
}
