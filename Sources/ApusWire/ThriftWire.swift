import NIOCore

/// The Thrift protocol a message is encoded in (a function's `thrift.encoding`).
package enum ThriftEncoding: String, Hashable, Sendable, CaseIterable {
    case binary
    case compact
}

/// The parts of Thrift's binary and compact protocols the edge reads or writes: a message's envelope (name, type,
/// seqid), the length of a whole message found by skipping its struct field by field without building values, a
/// renamed envelope (multiplexed `Service:method` → `method`, as the instance sees it and as every reply names it),
/// and `TApplicationException` replies.
/// Specs: Apache Thrift doc/specs (thrift-binary-protocol.md, thrift-compact-protocol.md).
package enum ThriftWire {
    package typealias Encoding = ThriftEncoding

    package enum MessageType: UInt8 {
        case call = 1
        case reply = 2
        case exception = 3
        case oneway = 4
    }

    /// `TApplicationException` type codes used by the edge.
    package enum ApplicationError: Int32 {
        case unknown = 0
        case unknownMethod = 1
        case internalError = 6
        case protocolError = 7
    }

    package struct Envelope: Equatable {
        package var name: String
        package var type: MessageType
        package var seqid: Int32
        package var encoding: Encoding
        /// Binary only: the old (non-strict) form without a version word.
        package var oldBinary = false
        /// Bytes of the envelope at the start of the message.
        package var length: Int

        package init(name: String, type: MessageType, seqid: Int32, encoding: Encoding, oldBinary: Bool = false, length: Int) {
            self.name = name
            self.type = type
            self.seqid = seqid
            self.encoding = encoding
            self.oldBinary = oldBinary
            self.length = length
        }

        /// The name without a multiplexing prefix (`Calculator:add` → `add`): what Apache Thrift's
        /// TMultiplexedProcessor hands its inner processor, and so the name every reply carries.
        package var methodName: String {
            guard let colon = name.firstIndex(of: ":") else { return name }
            return String(name[name.index(after: colon)...])
        }
    }

    package enum ScanError: Error, Equatable {
        /// More bytes are needed.
        case incomplete
        case malformed(String)
    }

    /// Reads bytes of one buffer from an offset, failing with `.incomplete` at the end.
    package struct Cursor {
        package let buffer: ByteBuffer
        package var index: Int
        package let end: Int

        package init(_ buffer: ByteBuffer, at index: Int? = nil, end: Int? = nil) {
            self.buffer = buffer
            self.index = index ?? buffer.readerIndex
            self.end = end ?? buffer.writerIndex
        }

        package var remaining: Int { end - index }

        package mutating func u8() throws(ScanError) -> UInt8 {
            guard index < end else { throw .incomplete }
            defer { index += 1 }
            return buffer.getInteger(at: index)!
        }

        package mutating func u16() throws(ScanError) -> UInt16 {
            guard index + 2 <= end else { throw .incomplete }
            defer { index += 2 }
            return buffer.getInteger(at: index)!
        }

        package mutating func i32() throws(ScanError) -> Int32 {
            guard index + 4 <= end else { throw .incomplete }
            defer { index += 4 }
            return buffer.getInteger(at: index)!
        }

        package mutating func skip(_ count: Int) throws(ScanError) {
            guard count >= 0 else { throw .malformed("negative length \(count)") }
            guard index + count <= end else { throw .incomplete }
            index += count
        }

        package mutating func string(_ count: Int) throws(ScanError) -> String {
            guard count >= 0 else { throw .malformed("negative length \(count)") }
            guard index + count <= end else { throw .incomplete }
            defer { index += count }
            return buffer.getString(at: index, length: count) ?? ""
        }

        /// Unsigned LEB128 varint (compact protocol, THeader).
        package mutating func varint() throws(ScanError) -> UInt64 {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                let byte = try u8()
                value |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
                guard shift < 64 else { throw .malformed("varint too long") }
            }
        }

        package mutating func varint32() throws(ScanError) -> Int {
            let value = try varint()
            guard value <= UInt64(UInt32.max) else { throw .malformed("varint out of range") }
            return Int(value)
        }
    }

    package static let maxNameLength = 4096
    package static let maxDepth = 64

    // MARK: envelope

    /// Reads a message envelope at the cursor (binary strict or old, or compact).
    package static func readEnvelope(_ cursor: inout Cursor) throws(ScanError) -> Envelope {
        let start = cursor.index
        let first = try cursor.u8()
        if first == 0x82 {
            let versionAndType = try cursor.u8()
            guard versionAndType & 0x1F == 1 else { throw .malformed("unsupported compact protocol version \(versionAndType & 0x1F)") }
            let type = try messageType(versionAndType >> 5)
            let seqid = Int32(truncatingIfNeeded: try cursor.varint32())
            let nameLength = try cursor.varint32()
            guard nameLength <= maxNameLength else { throw .malformed("method name of \(nameLength) bytes") }
            let name = try cursor.string(nameLength)
            return Envelope(name: name, type: type, seqid: seqid, encoding: .compact, length: cursor.index - start)
        }
        cursor.index = start
        let word = try cursor.i32()
        if word < 0 {
            // Strict binary: version 1 in the high half, type in the low byte.
            guard UInt32(bitPattern: word) & 0xFFFF_0000 == 0x8001_0000 else {
                throw .malformed("unsupported binary protocol version 0x\(String(UInt32(bitPattern: word) >> 16, radix: 16))")
            }
            let type = try messageType(UInt8(truncatingIfNeeded: word))
            let nameLength = Int(try cursor.i32())
            guard nameLength >= 0, nameLength <= maxNameLength else { throw .malformed("method name of \(nameLength) bytes") }
            let name = try cursor.string(nameLength)
            let seqid = try cursor.i32()
            return Envelope(name: name, type: type, seqid: seqid, encoding: .binary, length: cursor.index - start)
        }
        // Old binary: the name's length comes first, then the name, the type byte and the seqid.
        let nameLength = Int(word)
        guard nameLength > 0, nameLength <= maxNameLength else { throw .malformed("not a Thrift message (name length \(nameLength))") }
        let name = try cursor.string(nameLength)
        let type = try messageType(try cursor.u8())
        let seqid = try cursor.i32()
        return Envelope(name: name, type: type, seqid: seqid, encoding: .binary, oldBinary: true, length: cursor.index - start)
    }

    private static func messageType(_ raw: UInt8) throws(ScanError) -> MessageType {
        guard let type = MessageType(rawValue: raw) else { throw .malformed("unknown message type \(raw)") }
        return type
    }

    /// The length of the whole message (envelope and its struct) starting at `start`, or `.incomplete`.
    package static func messageLength(_ buffer: ByteBuffer, at start: Int) throws(ScanError) -> Int {
        var scan = MessageScan()
        return try messageLength(buffer, at: start, resuming: &scan)
    }

    // MARK: scanning that resumes

    /// How far the scan of an unframed message got, kept between reads so that a message arriving in pieces is
    /// read once, not re-scanned from its start on every read (which made a message trickled in 2 KiB pieces cost
    /// time quadratic in its size). Progress is committed a whole unit at a time — a field with its value, a
    /// container's header, a run of fixed-size list elements — so running out of bytes mid-unit loses only that
    /// unit's few bytes, read again with the next piece.
    package struct MessageScan: Sendable {
        package enum Container: Sendable, Equatable {
            case binaryStruct
            case binaryList(element: UInt8, remaining: Int)
            case binaryMap(key: UInt8, value: UInt8, remaining: Int, valueNext: Bool)
            case compactStruct
            case compactList(element: UInt8, remaining: Int)
            case compactMap(key: UInt8, value: UInt8, remaining: Int, valueNext: Bool)
        }

        /// Bytes from the message's start that are known to belong to it (the envelope and every committed unit).
        package var committed = 0
        /// Open containers, innermost last; empty before the envelope is read.
        var open: [Container] = []
        package var envelopeRead = false

        package init() {}
    }

    /// The length of the whole message starting at `start`, resuming where `scan` stopped for want of bytes;
    /// `.incomplete` (with `scan` advanced) when the message is not all there yet.
    package static func messageLength(_ buffer: ByteBuffer, at start: Int, resuming scan: inout MessageScan) throws(ScanError) -> Int {
        var cursor = Cursor(buffer, at: start)
        if !scan.envelopeRead {
            let envelope = try readEnvelope(&cursor)
            scan.open = [envelope.encoding == .binary ? .binaryStruct : .compactStruct]
            scan.committed = cursor.index - start
            scan.envelopeRead = true
        }
        cursor.index = start + scan.committed
        while let innermost = scan.open.last {
            // One unit: every read first, then the change to the open containers (a unit cut short by the end of
            // the bytes changes nothing).
            var push: MessageScan.Container?
            var replacement: MessageScan.Container??  // .some(nil): close the innermost container
            switch innermost {
            case .binaryStruct:
                let fieldType = try cursor.u8()
                if fieldType == 0 {
                    replacement = .some(nil)
                } else {
                    try cursor.skip(2)
                    push = try binaryValue(type: fieldType, &cursor)
                }
            case .binaryList(let element, let remaining):
                if remaining == 0 {
                    replacement = .some(nil)
                } else if let size = binaryFixedSize(element) {
                    let (bytes, overflow) = remaining.multipliedReportingOverflow(by: size)
                    guard !overflow else { throw .malformed("list of \(remaining) elements") }
                    try cursor.skip(bytes)
                    replacement = .binaryList(element: element, remaining: 0)
                } else {
                    push = try binaryValue(type: element, &cursor)
                    replacement = .binaryList(element: element, remaining: remaining - 1)
                }
            case .binaryMap(let key, let value, let remaining, let valueNext):
                if remaining == 0 {
                    replacement = .some(nil)
                } else {
                    push = try binaryValue(type: valueNext ? value : key, &cursor)
                    replacement = .binaryMap(key: key, value: value, remaining: valueNext ? remaining - 1 : remaining, valueNext: !valueNext)
                }
            case .compactStruct:
                let header = try cursor.u8()
                if header == 0 {
                    replacement = .some(nil)
                } else {
                    if header >> 4 == 0 { _ = try cursor.varint() }  // long-form field id (zigzag i16)
                    push = try compactValue(type: header & 0x0F, &cursor, inCollection: false)
                }
            case .compactList(let element, let remaining):
                if remaining == 0 {
                    replacement = .some(nil)
                } else {
                    push = try compactValue(type: element, &cursor, inCollection: true)
                    replacement = .compactList(element: element, remaining: remaining - 1)
                }
            case .compactMap(let key, let value, let remaining, let valueNext):
                if remaining == 0 {
                    replacement = .some(nil)
                } else {
                    push = try compactValue(type: valueNext ? value : key, &cursor, inCollection: true)
                    replacement = .compactMap(key: key, value: value, remaining: valueNext ? remaining - 1 : remaining, valueNext: !valueNext)
                }
            }
            if let replacement {
                scan.open.removeLast()
                if let replacement { scan.open.append(replacement) }
            }
            if let push {
                guard scan.open.count < maxDepth else { throw .malformed("nesting deeper than \(maxDepth)") }
                scan.open.append(push)
            }
            scan.committed = cursor.index - start
        }
        return scan.committed
    }

    /// Bytes of a binary-protocol value of fixed size; nil for strings and containers.
    private static func binaryFixedSize(_ type: UInt8) -> Int? {
        switch type {
        case 2, 3: 1
        case 6: 2
        case 8: 4
        case 4, 10: 8
        case 16: 16
        default: nil
        }
    }

    /// Reads a binary-protocol value of `type`: skips it whole, or reads a container's header and returns the
    /// container to open.
    private static func binaryValue(type: UInt8, _ cursor: inout Cursor) throws(ScanError) -> MessageScan.Container? {
        if let size = binaryFixedSize(type) {
            try cursor.skip(size)
            return nil
        }
        switch type {
        case 11:
            try cursor.skip(Int(try cursor.i32()))  // string / binary
            return nil
        case 12:
            return .binaryStruct
        case 13:
            let keyType = try cursor.u8()
            let valueType = try cursor.u8()
            let count = Int(try cursor.i32())
            guard count >= 0 else { throw .malformed("negative map size") }
            return .binaryMap(key: keyType, value: valueType, remaining: count, valueNext: false)
        case 14, 15:
            let elementType = try cursor.u8()
            let count = Int(try cursor.i32())
            guard count >= 0 else { throw .malformed("negative list size") }
            return .binaryList(element: elementType, remaining: count)
        default:
            throw .malformed("unknown binary field type \(type)")
        }
    }

    /// Reads a compact-protocol value of compact type `type` (booleans in structs live in the field header; in
    /// collections they take one byte): skips it whole, or reads a container's header and returns it.
    private static func compactValue(type: UInt8, _ cursor: inout Cursor, inCollection: Bool) throws(ScanError) -> MessageScan.Container? {
        switch type {
        case 1, 2: if inCollection { try cursor.skip(1) }  // bool true/false
        case 3: try cursor.skip(1)  // byte
        case 4, 5, 6: _ = try cursor.varint()  // i16, i32, i64 (zigzag varints)
        case 7: try cursor.skip(8)  // double
        case 8: try cursor.skip(try cursor.varint32())  // binary / string
        case 13: try cursor.skip(16)  // uuid
        case 12: return .compactStruct
        case 9, 10:
            let header = try cursor.u8()
            var count = Int(header >> 4)
            if count == 15 { count = try cursor.varint32() }
            return .compactList(element: header & 0x0F, remaining: count)
        case 11:
            let count = try cursor.varint32()
            guard count > 0 else { return nil }
            let types = try cursor.u8()
            return .compactMap(key: types >> 4, value: types & 0x0F, remaining: count, valueNext: false)
        default:
            throw .malformed("unknown compact field type \(type)")
        }
        return nil
    }

    // MARK: writing

    package static func writeEnvelope(_ envelope: Envelope, into out: inout ByteBuffer) {
        switch envelope.encoding {
        case .compact:
            out.writeInteger(UInt8(0x82))
            out.writeInteger(UInt8(1) | envelope.type.rawValue << 5)
            writeVarint(UInt64(UInt32(bitPattern: envelope.seqid)), into: &out)
            writeVarint(UInt64(envelope.name.utf8.count), into: &out)
            out.writeString(envelope.name)
        case .binary where envelope.oldBinary:
            out.writeInteger(Int32(envelope.name.utf8.count))
            out.writeString(envelope.name)
            out.writeInteger(envelope.type.rawValue)
            out.writeInteger(envelope.seqid)
        case .binary:
            out.writeInteger(UInt32(0x8001_0000) | UInt32(envelope.type.rawValue))
            out.writeInteger(Int32(envelope.name.utf8.count))
            out.writeString(envelope.name)
            out.writeInteger(envelope.seqid)
        }
    }

    package static func writeVarint(_ value: UInt64, into out: inout ByteBuffer) {
        var rest = value
        while rest >= 0x80 {
            out.writeInteger(UInt8(rest & 0x7F | 0x80))
            rest >>= 7
        }
        out.writeInteger(UInt8(rest))
    }

    /// The message with its envelope's name replaced (the rest of the bytes unchanged).
    package static func renamed(_ message: ByteBuffer, envelope: Envelope, to name: String) -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: message.readableBytes + 8)
        var renamed = envelope
        renamed.name = name
        writeEnvelope(renamed, into: &out)
        var body = message.getSlice(at: message.readerIndex + envelope.length, length: message.readableBytes - envelope.length)!
        out.writeBuffer(&body)
        return out
    }

    /// A complete `TApplicationException` reply message: `{1: string message, 2: i32 type}`.
    package static func applicationException(
        name: String, seqid: Int32, encoding: Encoding, oldBinary: Bool = false, error: ApplicationError, message: String
    ) -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: 64 + name.utf8.count + message.utf8.count)
        writeEnvelope(Envelope(name: name, type: .exception, seqid: seqid, encoding: encoding, oldBinary: oldBinary, length: 0), into: &out)
        switch encoding {
        case .binary:
            out.writeInteger(UInt8(11))
            out.writeInteger(Int16(1))
            out.writeInteger(Int32(message.utf8.count))
            out.writeString(message)
            out.writeInteger(UInt8(8))
            out.writeInteger(Int16(2))
            out.writeInteger(error.rawValue)
            out.writeInteger(UInt8(0))
        case .compact:
            out.writeInteger(UInt8(0x18))  // field 1 (delta 1), binary
            writeVarint(UInt64(message.utf8.count), into: &out)
            out.writeString(message)
            out.writeInteger(UInt8(0x15))  // field 2 (delta 1), i32
            let zigzag = UInt32(bitPattern: (error.rawValue << 1) ^ (error.rawValue >> 31))
            writeVarint(UInt64(zigzag), into: &out)
            out.writeInteger(UInt8(0))
        }
        return out
    }
}
