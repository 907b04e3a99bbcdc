/// Finds where a chunked body ends without decoding it: the bytes pass through unchanged, the scanner only
/// follows chunk sizes, data, and the trailer section (RFC 9112 §7.1). Callers that must unwrap the body (the
/// sidecar, relaying HTTP/1.1 to HTTP/2) also learn which byte ranges are payload. Shared with the mesh sidecar.
package struct ChunkedBodyScanner {
    package enum ScanError: Error { case malformed, tooLarge }

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
    /// Payload bytes seen so far (chunk data only).
    package private(set) var payloadBytes = 0
    package let maxPayload: Int

    package init(maxPayload: Int = .max) {
        self.maxPayload = maxPayload
    }

    package var isDone: Bool {
        if case .done = state { return true }
        return false
    }

    /// Consumes bytes of the body; returns how many belong to it (fewer than `bytes.count` only once done).
    package mutating func scan(_ bytes: UnsafeRawBufferPointer) throws(ScanError) -> Int {
        try scan(bytes) { _ in }
    }

    /// `scan`, handing `payload` each range of chunk data (offsets into `bytes`).
    package mutating func scan(_ bytes: UnsafeRawBufferPointer, payload: (Range<Int>) -> Void) throws(ScanError) -> Int {
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
                if value == 0 {
                    state = .trailerLineStart
                } else {
                    payloadBytes += value
                    guard payloadBytes <= maxPayload else { throw .tooLarge }
                    state = .data(remaining: value)
                }
            case .data(let remaining):
                let take = min(remaining, n - i)
                payload(i..<(i + take))
                i += take
                state = remaining - take == 0 ? .dataCR : .data(remaining: remaining - take)
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
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(b - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(b - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return Int(b - UInt8(ascii: "A") + 10)
        default: return nil
        }
    }
}

/// How the end of a message body is found.
package enum BodyFraming {
    case none
    case length(remaining: Int)
    case chunked(ChunkedBodyScanner)
    /// Response bodies without length: they end when the connection closes.
    case untilClose
}
