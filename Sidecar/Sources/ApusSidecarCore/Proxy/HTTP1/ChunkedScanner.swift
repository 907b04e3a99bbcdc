/// Follows a chunked body (RFC 9112 §7.1) without copying it: reports where it ends and, for callers that must
/// unwrap it (HTTP/1.1 → HTTP/2), which byte ranges are payload.
struct ChunkedScanner {
    enum ScanError: Error { case malformed }

    private enum State {
        case size(value: Int, digits: Int)
        case sizeExtension(value: Int)
        case sizeLF(value: Int)
        case data(remaining: Int)
        case dataCR
        case dataLF
        case trailerLineStart
        case trailerLine
        case trailerLF(blank: Bool)
        case done
    }

    private var state = State.size(value: 0, digits: 0)

    var isDone: Bool {
        if case .done = state { return true }
        return false
    }

    /// Consumes body bytes; returns how many belong to the body. `payload` gets each data range.
    mutating func scan(_ bytes: UnsafeRawBufferPointer, payload: (Range<Int>) -> Void = { _ in }) throws(ScanError) -> Int {
        var i = 0
        let n = bytes.count
        while i < n {
            switch state {
            case .done:
                return i
            case .size(let value, let digits):
                let b = bytes[i]
                if let digit = Self.hex(b) {
                    guard digits < 15 else { throw .malformed }
                    state = .size(value: value << 4 | digit, digits: digits + 1)
                } else if digits > 0 && (b == UInt8(ascii: ";") || b == UInt8(ascii: " ") || b == UInt8(ascii: "\t")) {
                    state = .sizeExtension(value: value)
                } else if digits > 0 && b == UInt8(ascii: "\r") {
                    state = .sizeLF(value: value)
                } else {
                    throw .malformed
                }
                i += 1
            case .sizeExtension(let value):
                if bytes[i] == UInt8(ascii: "\r") { state = .sizeLF(value: value) }
                i += 1
            case .sizeLF(let value):
                guard bytes[i] == UInt8(ascii: "\n") else { throw .malformed }
                i += 1
                state = value == 0 ? .trailerLineStart : .data(remaining: value)
            case .data(let remaining):
                let take = min(remaining, n - i)
                payload(i..<(i + take))
                i += take
                state = remaining == take ? .dataCR : .data(remaining: remaining - take)
            case .dataCR:
                guard bytes[i] == UInt8(ascii: "\r") else { throw .malformed }
                state = .dataLF
                i += 1
            case .dataLF:
                guard bytes[i] == UInt8(ascii: "\n") else { throw .malformed }
                state = .size(value: 0, digits: 0)
                i += 1
            case .trailerLineStart:
                state = bytes[i] == UInt8(ascii: "\r") ? .trailerLF(blank: true) : .trailerLine
                i += 1
            case .trailerLine:
                if bytes[i] == UInt8(ascii: "\r") { state = .trailerLF(blank: false) }
                i += 1
            case .trailerLF(let blank):
                guard bytes[i] == UInt8(ascii: "\n") else { throw .malformed }
                state = blank ? .done : .trailerLineStart
                i += 1
            }
        }
        return i
    }

    private static func hex(_ b: UInt8) -> Int? {
        switch b {
        case 48...57: Int(b - 48)
        case 97...102: Int(b - 87)
        case 65...70: Int(b - 55)
        default: nil
        }
    }
}

/// How the end of a message body is found.
enum BodyFraming {
    case none
    case length(remaining: Int)
    case chunked(ChunkedScanner)
    /// Responses without a length end when the connection closes.
    case untilClose
}
