import NIOCore

/// The spans of a head that are copied through, kept without a heap allocation for the common case: a head has
/// few runs of kept lines (only dropped hop-by-hop or `X-Apus-*` lines split them). Adjacent spans merge.
package struct ByteSpans: Sequence {
    @usableFromInline
    var inline: (Range<Int>, Range<Int>, Range<Int>, Range<Int>) = (0..<0, 0..<0, 0..<0, 0..<0)
    private var inlineCount = 0
    @usableFromInline
    var overflow: [Range<Int>] = []

    package private(set) var count = 0

    package init() {}

    /// Adds the line `span`, merging it with the previous span when they touch.
    package mutating func append(_ span: Range<Int>) {
        if count > 0, last.upperBound == span.lowerBound {
            setLast(last.lowerBound..<span.upperBound)
            return
        }
        switch inlineCount {
        case 0: inline.0 = span
        case 1: inline.1 = span
        case 2: inline.2 = span
        case 3: inline.3 = span
        default: overflow.append(span)
        }
        if inlineCount < 4 { inlineCount += 1 }
        count += 1
    }

    private var last: Range<Int> { self[count - 1] }

    private mutating func setLast(_ span: Range<Int>) {
        switch count - 1 {
        case 0: inline.0 = span
        case 1: inline.1 = span
        case 2: inline.2 = span
        case 3: inline.3 = span
        default: overflow[overflow.count - 1] = span
        }
    }

    @inlinable
    package subscript(index: Int) -> Range<Int> {
        switch index {
        case 0: inline.0
        case 1: inline.1
        case 2: inline.2
        case 3: inline.3
        default: overflow[index - 4]
        }
    }

    package func makeIterator() -> AnyIterator<Range<Int>> {
        var i = 0
        return AnyIterator {
            guard i < count else { return nil }
            defer { i += 1 }
            return self[i]
        }
    }

    /// Calls `body` for each span in order (no iterator allocation).
    @inlinable
    package func forEach(_ body: (Range<Int>) -> Void) {
        for i in 0..<count { body(self[i]) }
    }

    /// Copies the spans of `bytes` to `out`, in order.
    package func write(from bytes: UnsafeRawBufferPointer, to out: inout ByteBuffer) {
        forEach { out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[$0])) }
    }
}
