import NIOCore

/// Byte-level helpers for the sidecar's minimal HTTP/1.1 codec (the same approach as the gateway's edge: read the
/// few fields routing and framing need, copy the other header bytes through).
enum Bytes {
    static let cr = UInt8(ascii: "\r")
    static let lf = UInt8(ascii: "\n")
    static let colon = UInt8(ascii: ":")
    static let space = UInt8(ascii: " ")
    static let tab = UInt8(ascii: "\t")

    /// Offset just past the blank line ending a head, or nil when the head is not complete.
    static func endOfHead(_ bytes: UnsafeRawBufferPointer) -> Int? {
        var i = 0
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

    @inline(__always)
    static func lower(_ b: UInt8) -> UInt8 { (b >= 65 && b <= 90) ? b | 0x20 : b }

    static func equalsLowercase(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ name: StaticString) -> Bool {
        guard range.count == name.utf8CodeUnitCount else { return false }
        let p = name.utf8Start
        var j = 0
        for i in range {
            if lower(bytes[i]) != p[j] { return false }
            j += 1
        }
        return true
    }

    static func equalsLowercase(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ name: [UInt8]) -> Bool {
        guard range.count == name.count else { return false }
        var j = 0
        for i in range {
            if lower(bytes[i]) != name[j] { return false }
            j += 1
        }
        return true
    }

    static func string(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self)
    }

    static func decimal(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int? {
        guard !range.isEmpty, range.count <= 18 else { return nil }
        var value = 0
        for i in range {
            let digit = Int(bytes[i]) - 48
            guard digit >= 0 && digit <= 9 else { return nil }
            value = value * 10 + digit
        }
        return value
    }

    static func trimmed(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Range<Int> {
        var lo = range.lowerBound, hi = range.upperBound
        while lo < hi, bytes[lo] == space || bytes[lo] == tab { lo += 1 }
        while hi > lo, bytes[hi - 1] == space || bytes[hi - 1] == tab { hi -= 1 }
        return lo..<hi
    }

    static func containsToken(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ token: StaticString) -> Bool {
        var start = range.lowerBound
        while start <= range.upperBound {
            var end = start
            while end < range.upperBound, bytes[end] != UInt8(ascii: ",") { end += 1 }
            if equalsLowercase(bytes, trimmed(bytes, start..<end), token) { return true }
            start = end + 1
        }
        return false
    }

    /// Calls `body(name, value, line)` for each header line of `bytes[from..<headEnd]`; false on a malformed line.
    static func forEachHeader(
        _ bytes: UnsafeRawBufferPointer, from: Int, headEnd: Int,
        _ body: (Range<Int>, Range<Int>, Range<Int>) -> Bool
    ) -> Bool {
        var lineStart = from
        let limit = headEnd - 2
        while lineStart < limit {
            var lineEnd = lineStart
            while lineEnd < limit, bytes[lineEnd] != lf { lineEnd += 1 }
            guard lineEnd < limit || bytes[lineEnd] == lf else { return false }
            let contentEnd = (lineEnd > lineStart && bytes[lineEnd - 1] == cr) ? lineEnd - 1 : lineEnd
            guard contentEnd > lineStart, bytes[lineStart] != space, bytes[lineStart] != tab else { return false }
            var colon = lineStart
            while colon < contentEnd, bytes[colon] != Bytes.colon { colon += 1 }
            guard colon < contentEnd, colon > lineStart, bytes[colon - 1] != space else { return false }
            if !body(lineStart..<colon, trimmed(bytes, (colon + 1)..<contentEnd), lineStart..<(lineEnd + 1)) { return false }
            lineStart = lineEnd + 1
        }
        return true
    }
}

extension ByteBuffer {
    @inline(__always)
    mutating func writeStatic(_ s: StaticString) {
        writeBytes(UnsafeRawBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount))
    }

    /// Writes a non-negative integer in decimal without making a String.
    mutating func writeDecimal(_ value: Int) {
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

/// Spans of head lines copied through unchanged; adjacent spans merge.
struct ByteSpans {
    private(set) var spans: [Range<Int>] = []

    init() { spans.reserveCapacity(4) }

    mutating func append(_ span: Range<Int>) {
        if let last = spans.last, last.upperBound == span.lowerBound {
            spans[spans.count - 1] = last.lowerBound..<span.upperBound
        } else {
            spans.append(span)
        }
    }

    func write(from bytes: UnsafeRawBufferPointer, to out: inout ByteBuffer) {
        for span in spans { out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[span])) }
    }
}
