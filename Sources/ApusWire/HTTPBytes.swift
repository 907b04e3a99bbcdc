import NIOCore

/// Byte-level helpers for the minimal HTTP/1.1 codec: the gateway reads only the few header fields it routes
/// or frames by and copies every other byte through unchanged. Shared with the mesh sidecar's HTTP/1.1 proxy
/// (`package`, inlinable across the module boundary).
package enum HTTPBytes {
    package static let cr = UInt8(ascii: "\r")
    package static let lf = UInt8(ascii: "\n")
    package static let colon = UInt8(ascii: ":")
    package static let space = UInt8(ascii: " ")
    package static let tab = UInt8(ascii: "\t")

    /// Offset just past the blank line ending a head (`\r\n\r\n`), searching from `from`; nil if not complete.
    @inlinable
    package static func endOfHead(_ bytes: UnsafeRawBufferPointer, from: Int = 0) -> Int? {
        var i = max(from, 0)
        let n = bytes.count
        while i + 3 < n {
            if bytes[i + 3] == lf {
                if bytes[i + 2] == cr && bytes[i + 1] == lf && bytes[i] == cr { return i + 4 }
                i += 1
            } else if bytes[i + 3] == cr {
                i += 1
            } else {
                i += 4
            }
        }
        return nil
    }

    @inlinable @inline(__always)
    package static func lower(_ b: UInt8) -> UInt8 {
        (b >= 65 && b <= 90) ? b | 0x20 : b
    }

    /// Case-insensitive comparison of `bytes[range]` with a lower-case ASCII name.
    @inlinable
    package static func equalsLowercase(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ name: StaticString) -> Bool {
        guard range.count == name.utf8CodeUnitCount else { return false }
        let pointer = name.utf8Start
        var j = 0
        for i in range {
            if lower(bytes[i]) != pointer[j] { return false }
            j += 1
        }
        return true
    }

    /// Case-insensitive comparison of `bytes[range]` with a lower-case ASCII name given as bytes.
    @inlinable
    package static func equalsLowercase(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ name: [UInt8]) -> Bool {
        guard range.count == name.count else { return false }
        var j = 0
        for i in range {
            if lower(bytes[i]) != name[j] { return false }
            j += 1
        }
        return true
    }

    @inlinable
    package static func hasPrefixLowercase(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ prefix: StaticString) -> Bool {
        guard range.count >= prefix.utf8CodeUnitCount else { return false }
        let pointer = prefix.utf8Start
        for j in 0..<prefix.utf8CodeUnitCount where lower(bytes[range.lowerBound + j]) != pointer[j] { return false }
        return true
    }

    @inlinable
    package static func string(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self)
    }

    /// Parses a non-negative decimal (Content-Length); nil on anything else or overflow.
    @inlinable
    package static func decimal(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int? {
        guard !range.isEmpty, range.count <= 18 else { return nil }
        var value = 0
        for i in range {
            let digit = Int(bytes[i]) - 48
            guard digit >= 0 && digit <= 9 else { return nil }
            value = value * 10 + digit
        }
        return value
    }

    /// The value range of a header line with surrounding whitespace removed.
    @inlinable
    package static func trimmed(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Range<Int> {
        var lo = range.lowerBound
        var hi = range.upperBound
        while lo < hi, bytes[lo] == space || bytes[lo] == tab { lo += 1 }
        while hi > lo, bytes[hi - 1] == space || bytes[hi - 1] == tab { hi -= 1 }
        return lo..<hi
    }

    /// Whether a comma-separated header value contains `token` (case-insensitive), e.g. `close` in Connection.
    @inlinable
    package static func containsToken(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ token: StaticString) -> Bool {
        var start = range.lowerBound
        while start <= range.upperBound {
            var end = start
            while end < range.upperBound, bytes[end] != UInt8(ascii: ",") { end += 1 }
            if equalsLowercase(bytes, trimmed(bytes, start..<end), token) { return true }
            start = end + 1
        }
        return false
    }

    /// Calls `body(nameRange, valueRange, lineRange)` for each header line in `bytes[from..<headEnd]`
    /// (`lineRange` includes the CRLF). Returns false on a malformed line.
    @inlinable
    package static func forEachHeader(
        _ bytes: UnsafeRawBufferPointer, from: Int, headEnd: Int,
        _ body: (Range<Int>, Range<Int>, Range<Int>) -> Bool
    ) -> Bool {
        var lineStart = from
        let limit = headEnd - 2  // the final CRLF of the blank line
        while lineStart < limit {
            var lineEnd = lineStart
            while lineEnd < limit, bytes[lineEnd] != lf { lineEnd += 1 }
            guard lineEnd < limit || bytes[lineEnd] == lf else { return false }
            let contentEnd = (lineEnd > lineStart && bytes[lineEnd - 1] == cr) ? lineEnd - 1 : lineEnd
            guard contentEnd > lineStart, bytes[lineStart] != space, bytes[lineStart] != tab else { return false }  // no obs-fold
            var colon = lineStart
            while colon < contentEnd, bytes[colon] != HTTPBytes.colon { colon += 1 }
            guard colon < contentEnd, colon > lineStart, bytes[colon - 1] != space else { return false }
            if !body(lineStart..<colon, trimmed(bytes, (colon + 1)..<contentEnd), lineStart..<(lineEnd + 1)) { return false }
            lineStart = lineEnd + 1
        }
        return true
    }
}

extension ByteBuffer {
    @inlinable @inline(__always)
    package mutating func writeStatic(_ s: StaticString) {
        writeBytes(UnsafeRawBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount))
    }

    /// Writes a non-negative integer in decimal without making a String.
    @inlinable
    package mutating func writeDecimal(_ value: Int) {
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var v = value < 0 ? 0 : value
        var count = 0
        withUnsafeMutableBytes(of: &digits) { raw in
            repeat {
                raw[19 - count] = UInt8(48 + v % 10)
                v /= 10
                count += 1
            } while v > 0
            writeBytes(UnsafeRawBufferPointer(rebasing: raw[(20 - count)...]))
        }
    }
}

/// Appends bytes into memory reserved up front (a `ByteBuffer`'s writable space) with plain copies. The caller
/// reserves enough: writing past the end traps.
package struct HeadWriter {
    private let space: UnsafeMutableRawBufferPointer
    package private(set) var count = 0

    package init(_ space: UnsafeMutableRawBufferPointer) {
        self.space = space
    }

    @inline(__always)
    package mutating func add(_ bytes: UnsafeRawBufferPointer) {
        precondition(count + bytes.count <= space.count, "head writer overflow")
        if let source = bytes.baseAddress, bytes.count > 0 {
            (space.baseAddress! + count).copyMemory(from: source, byteCount: bytes.count)
        }
        count += bytes.count
    }

    @inline(__always)
    package mutating func add(_ text: StaticString) {
        add(UnsafeRawBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    /// Reads the string's UTF-8 in place (no copy of the string: that would retain and release it per call).
    @inline(__always)
    package mutating func add(_ text: String) {
        let done: Void? = text.utf8.withContiguousStorageIfAvailable { add(UnsafeRawBufferPointer($0)) }
        if done == nil {
            for byte in text.utf8 { add(byte) }
        }
    }

    @inline(__always)
    package mutating func add(_ byte: UInt8) {
        precondition(count < space.count, "head writer overflow")
        space[count] = byte
        count += 1
    }

    package mutating func addDecimal(_ value: Int) {
        var v = value < 0 ? 0 : value
        var digits = 1
        var probe = v
        while probe >= 10 {
            probe /= 10
            digits += 1
        }
        precondition(count + digits <= space.count, "head writer overflow")
        var position = count + digits - 1
        repeat {
            space[position] = UInt8(48 + v % 10)
            v /= 10
            position -= 1
        } while v > 0
        count += digits
    }
}
