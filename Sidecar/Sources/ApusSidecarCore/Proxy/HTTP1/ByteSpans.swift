import NIOCore

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
