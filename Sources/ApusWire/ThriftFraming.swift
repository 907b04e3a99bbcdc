import NIOCore

/// How a peer frames Thrift messages on its connection.
package enum ThriftTransport: String, Equatable, Sendable {
    /// 4-byte big-endian length, then the message.
    case framed
    /// Messages back to back (TBufferedTransport); delimited by skipping the message's struct.
    case buffered
    /// Apache THeader: length, magic 0x0FFF, flags, sequence number, varint header with key-value infos.
    case theader
    /// CloudWeGo TTHeader (Kitex): length, magic 0x1000, flags, sequence number, uint8/uint16 header fields
    /// with string and integer key-value infos.
    case ttheader
}

/// One complete Thrift message as it arrived, with what its transport carried around it.
package struct ThriftFrame: Equatable {
    package var transport: ThriftTransport
    package var envelope: ThriftWire.Envelope
    /// The message itself (envelope and struct), without transport framing.
    package var message: ByteBuffer
    /// THeader/TTHeader sequence number and flags.
    package var headerSeqid: Int32 = 0
    package var headerFlags: UInt16 = 0
    /// THeader and TTHeader string key-values.
    package var headers: [String: String] = [:]
    /// TTHeader integer-keyed values (e.g. 6 TO_SERVICE, 9 TO_METHOD, 12 RPC timeout in ms).
    package var intHeaders: [UInt16: String] = [:]

    package init(transport: ThriftTransport, envelope: ThriftWire.Envelope, message: ByteBuffer, headerSeqid: Int32 = 0,
                 headerFlags: UInt16 = 0, headers: [String: String] = [:], intHeaders: [UInt16: String] = [:]) {
        self.transport = transport
        self.envelope = envelope
        self.message = message
        self.headerSeqid = headerSeqid
        self.headerFlags = headerFlags
        self.headers = headers
        self.intHeaders = intHeaders
    }
}

package struct ThriftDecodingError: Error, CustomStringConvertible {
    package var description: String
}

/// Splits a byte stream into Thrift messages. On the client side it detects each message's transport (framed,
/// buffered, THeader, TTHeader) and protocol (binary strict or old, compact) from its first bytes; on the
/// instance side it reads the one transport the instance declared.
package struct ThriftFrameDecoder: ByteToMessageDecoder {
    package typealias InboundOut = ThriftFrame

    package static let theaderMagic: UInt16 = 0x0FFF
    package static let ttheaderMagic: UInt16 = 0x1000

    package let maxFrameSize: Int
    package let expected: ThriftTransport?
    /// How far the unframed message at the front of the buffer has been scanned (kept across reads).
    package var scan = ThriftWire.MessageScan()
    /// The gateway-wide cap on bytes held in unfinished messages (nil: none, as on the instance side).
    package let budget: BufferedBytesBudget?
    /// What this connection holds against `budget` now.
    private var held = 0

    package init(maxFrameSize: Int, expected: ThriftTransport? = nil, budget: BufferedBytesBudget? = nil) {
        self.maxFrameSize = maxFrameSize
        self.expected = expected
        self.budget = budget
    }

    package mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try Self.nextFrame(&buffer, maxFrameSize: maxFrameSize, expected: expected, scan: &scan) else {
            try hold(buffer.readableBytes)
            return .needMoreData
        }
        try hold(0)
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    package mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        try hold(0)
        return .needMoreData
    }

    package mutating func decoderRemoved(context: ChannelHandlerContext) {
        try? hold(0)
    }

    /// Records that this connection now holds `bytes` of an unfinished message; throws when the gateway-wide
    /// budget has no room for them.
    private mutating func hold(_ bytes: Int) throws(ThriftDecodingError) {
        guard let budget, bytes != held else { return }
        guard budget.update(from: held, to: bytes) else {
            let over = ThriftDecodingError(description: "unfinished Thrift messages of all connections would hold more than \(budget.limit) bytes (--thrift-max-buffered); this connection holds \(bytes)")
            _ = budget.update(from: held, to: 0)
            held = 0
            throw over
        }
        held = bytes
    }

    /// Takes one complete message off the front of `buffer`, or returns nil (and consumes nothing) when more bytes
    /// are needed.
    package static func nextFrame(_ buffer: inout ByteBuffer, maxFrameSize: Int, expected: ThriftTransport?) throws(ThriftDecodingError) -> ThriftFrame? {
        var scan = ThriftWire.MessageScan()
        return try nextFrame(&buffer, maxFrameSize: maxFrameSize, expected: expected, scan: &scan)
    }

    /// `nextFrame`, resuming the scan of an unframed message where the previous call stopped (`scan` is reset
    /// once a message is taken, or on an error).
    package static func nextFrame(_ buffer: inout ByteBuffer, maxFrameSize: Int, expected: ThriftTransport?,
                                  scan: inout ThriftWire.MessageScan) throws(ThriftDecodingError) -> ThriftFrame? {
        let start = buffer.readerIndex
        guard buffer.readableBytes >= 4, let first = buffer.getInteger(at: start, as: UInt8.self) else { return nil }
        let transport: ThriftTransport
        if let expected {
            transport = expected
        } else if first == 0x80 || first == 0x82 {
            transport = .buffered
        } else {
            guard buffer.readableBytes >= 8 else { return nil }
            let magic = buffer.getInteger(at: start + 4, as: UInt16.self)!
            let fifth = buffer.getInteger(at: start + 4, as: UInt8.self)!
            let word = buffer.getInteger(at: start, as: Int32.self)!
            if magic == theaderMagic {
                transport = .theader
            } else if magic == ttheaderMagic {
                transport = .ttheader
            } else if fifth == 0x80 || fifth == 0x82 {
                transport = .framed
            } else if (1...255).contains(word), isNameByte(fifth) {
                transport = .buffered  // old binary, unframed: the name's length, then the name
            } else {
                transport = .framed
            }
        }
        switch transport {
        case .buffered:
            let length: Int
            do throws(ThriftWire.ScanError) {
                length = try ThriftWire.messageLength(buffer, at: start, resuming: &scan)
                scan = ThriftWire.MessageScan()
            } catch {
                switch error {
                case .incomplete:
                    guard buffer.readableBytes <= maxFrameSize else {
                        scan = ThriftWire.MessageScan()
                        throw ThriftDecodingError(description: "unframed message exceeds the \(maxFrameSize)-byte limit")
                    }
                    return nil
                case .malformed(let reason):
                    scan = ThriftWire.MessageScan()
                    throw ThriftDecodingError(description: "malformed message: \(reason)")
                }
            }
            guard length <= maxFrameSize else { throw ThriftDecodingError(description: "message of \(length) bytes exceeds the \(maxFrameSize)-byte limit") }
            let message = buffer.readSlice(length: length)!
            return ThriftFrame(transport: .buffered, envelope: try envelope(of: message), message: message)
        case .framed, .theader, .ttheader:
            let length = Int(buffer.getInteger(at: start, as: UInt32.self)!)
            guard length > 0, length <= maxFrameSize else {
                throw ThriftDecodingError(description: "frame of \(length) bytes is outside 1...\(maxFrameSize) (the frame size limit)")
            }
            guard buffer.readableBytes >= 4 + length else { return nil }
            buffer.moveReaderIndex(forwardBy: 4)
            let body = buffer.readSlice(length: length)!
            if transport == .framed {
                return ThriftFrame(transport: .framed, envelope: try envelope(of: body), message: body)
            }
            return try parseHeaderFrame(body, transport: transport)
        }
    }

    private static func isNameByte(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte) || byte == UInt8(ascii: "_")
    }

    private static func envelope(of message: ByteBuffer) throws(ThriftDecodingError) -> ThriftWire.Envelope {
        var cursor = ThriftWire.Cursor(message)
        do throws(ThriftWire.ScanError) {
            return try ThriftWire.readEnvelope(&cursor)
        } catch {
            switch error {
            case .incomplete:
                throw ThriftDecodingError(description: "frame ends inside the message envelope")
            case .malformed(let reason):
                throw ThriftDecodingError(description: "malformed message: \(reason)")
            }
        }
    }

    /// THeader/TTHeader frame body (after the length): magic, flags, seqid, header size, header, payload.
    package static func parseHeaderFrame(_ body: ByteBuffer, transport: ThriftTransport) throws(ThriftDecodingError) -> ThriftFrame {
        let ttheader = transport == .ttheader
        var cursor = ThriftWire.Cursor(body)
        var frame: ThriftFrame
        do throws(ThriftWire.ScanError) {
            _ = try cursor.u16()  // magic, already checked
            let flags = try cursor.u16()
            let seqid = try cursor.i32()
            let headerLength = Int(try cursor.u16()) * 4
            let headerEnd = cursor.index + headerLength
            guard headerEnd <= cursor.end else { throw ThriftWire.ScanError.malformed("header size beyond the frame") }
            var header = ThriftWire.Cursor(body, at: cursor.index, end: headerEnd)
            let protocolID = ttheader ? Int(try header.u8()) : try header.varint32()
            let transforms = ttheader ? Int(try header.u8()) : try header.varint32()
            guard transforms == 0 else {
                throw ThriftWire.ScanError.malformed("\(transforms) transform(s) (zlib/snappy) requested; the gateway passes payloads untransformed only")
            }
            var headers: [String: String] = [:]
            var intHeaders: [UInt16: String] = [:]
            infos: while header.remaining > 0 {
                let infoID = ttheader ? Int(try header.u8()) : try header.varint32()
                switch (infoID, ttheader) {
                case (0, _):
                    continue  // padding
                case (1, false):
                    for _ in 0..<(try header.varint32()) {
                        let key = try header.string(try header.varint32())
                        headers[key] = try header.string(try header.varint32())
                    }
                case (1, true), (0x11, true):
                    let count = infoID == 0x11 ? 1 : Int(try header.u16())
                    for _ in 0..<count {
                        let key = infoID == 0x11 ? "acl-token" : try header.string(Int(try header.u16()))
                        headers[key] = try header.string(Int(try header.u16()))
                    }
                case (0x10, true):
                    for _ in 0..<(try header.u16()) {
                        let key = try header.u16()
                        intHeaders[key] = try header.string(Int(try header.u16()))
                    }
                default:
                    break infos  // unknown infos are ignorable: the payload starts at the header's end
                }
            }
            let payload = body.getSlice(at: headerEnd, length: body.writerIndex - headerEnd)!
            var envelopeCursor = ThriftWire.Cursor(payload)
            let envelope = try ThriftWire.readEnvelope(&envelopeCursor)
            let expectedID = envelope.encoding == .binary ? 0 : 2
            guard protocolID == expectedID else {
                throw ThriftWire.ScanError.malformed("header names protocol \(protocolID) but the payload is \(envelope.encoding.rawValue)")
            }
            frame = ThriftFrame(transport: transport, envelope: envelope, message: payload, headerSeqid: seqid, headerFlags: flags,
                                headers: headers, intHeaders: intHeaders)
        } catch {
            switch error {
            case .incomplete:
                throw ThriftDecodingError(description: "\(transport.rawValue) frame ends inside its header")
            case .malformed(let reason):
                throw ThriftDecodingError(description: "malformed \(transport.rawValue) frame: \(reason)")
            }
        }
        return frame
    }
}

/// Writes a message with a transport's framing.
package enum ThriftFraming {
    package static func encode(
        _ message: ByteBuffer, transport: ThriftTransport, encoding: ThriftWire.Encoding,
        headerSeqid: Int32 = 0, headers: [(String, String)] = [], intHeaders: [(UInt16, String)] = [],
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var message = message
        switch transport {
        case .buffered:
            return message
        case .framed:
            var out = allocator.buffer(capacity: 4 + message.readableBytes)
            out.writeInteger(UInt32(message.readableBytes))
            out.writeBuffer(&message)
            return out
        case .theader, .ttheader:
            let ttheader = transport == .ttheader
            var header = allocator.buffer(capacity: 64)
            let protocolID: UInt8 = encoding == .binary ? 0 : 2
            if ttheader {
                header.writeInteger(protocolID)
                header.writeInteger(UInt8(0))  // no transforms
                if !headers.isEmpty {
                    header.writeInteger(UInt8(0x01))
                    header.writeInteger(UInt16(headers.count))
                    for (key, value) in headers {
                        header.writeInteger(UInt16(key.utf8.count)); header.writeString(key)
                        header.writeInteger(UInt16(value.utf8.count)); header.writeString(value)
                    }
                }
                if !intHeaders.isEmpty {
                    header.writeInteger(UInt8(0x10))
                    header.writeInteger(UInt16(intHeaders.count))
                    for (key, value) in intHeaders {
                        header.writeInteger(key)
                        header.writeInteger(UInt16(value.utf8.count)); header.writeString(value)
                    }
                }
            } else {
                ThriftWire.writeVarint(UInt64(protocolID), into: &header)
                ThriftWire.writeVarint(0, into: &header)  // no transforms
                if !headers.isEmpty {
                    ThriftWire.writeVarint(1, into: &header)
                    ThriftWire.writeVarint(UInt64(headers.count), into: &header)
                    for (key, value) in headers {
                        ThriftWire.writeVarint(UInt64(key.utf8.count), into: &header); header.writeString(key)
                        ThriftWire.writeVarint(UInt64(value.utf8.count), into: &header); header.writeString(value)
                    }
                }
            }
            while header.readableBytes % 4 != 0 { header.writeInteger(UInt8(0)) }
            var out = allocator.buffer(capacity: 14 + header.readableBytes + message.readableBytes)
            out.writeInteger(UInt32(10 + header.readableBytes + message.readableBytes))
            out.writeInteger(ttheader ? ThriftFrameDecoder.ttheaderMagic : ThriftFrameDecoder.theaderMagic)
            out.writeInteger(UInt16(0))  // flags
            out.writeInteger(headerSeqid)
            out.writeInteger(UInt16(header.readableBytes / 4))
            out.writeBuffer(&header)
            out.writeBuffer(&message)
            return out
        }
    }
}
