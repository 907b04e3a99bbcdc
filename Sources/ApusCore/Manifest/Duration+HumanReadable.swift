import Foundation

extension Duration {
    /// The longest duration parsed (about 31,700 years): anything longer is refused rather than overflowing.
    static let maxHumanReadableMilliseconds: Double = 1e15

    /// Parses `500ms`, `30s`, `2m`, `1h`, `1m30s` or a bare number of seconds (nil past about 31,700 years).
    public init?(humanReadable text: String) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty else { return nil }
        if let seconds = Double(trimmed), seconds >= 0, seconds.isFinite {
            guard seconds * 1000 <= Self.maxHumanReadableMilliseconds else { return nil }
            self = .milliseconds(Int64((seconds * 1000).rounded()))
            return
        }
        var total: Int64 = 0  // milliseconds
        var number = ""
        var unit = ""
        var sawComponent = false
        func flush() -> Bool {
            guard !number.isEmpty, let value = Double(number), value.isFinite else { return false }
            let factor: Double
            switch unit {
            case "ms": factor = 1
            case "s": factor = 1000
            case "m": factor = 60_000
            case "h": factor = 3_600_000
            default: return false
            }
            let milliseconds = (value * factor).rounded()
            guard milliseconds <= Self.maxHumanReadableMilliseconds,
                  Double(total) + milliseconds <= Self.maxHumanReadableMilliseconds else { return false }
            total += Int64(milliseconds)
            number = ""
            unit = ""
            sawComponent = true
            return true
        }
        for ch in trimmed {
            if ch.isNumber || ch == "." {
                if !unit.isEmpty { guard flush() else { return nil } }
                number.append(ch)
            } else if ch.isLetter {
                guard !number.isEmpty else { return nil }
                unit.append(ch)
            } else {
                return nil
            }
        }
        guard flush(), sawComponent else { return nil }
        self = .milliseconds(total)
    }

    /// The shortest exact human form: `30s`, `1500ms`, `2m`, `1h`.
    public var humanReadable: String {
        let ms = milliseconds
        if ms % 3_600_000 == 0, ms > 0 { return "\(ms / 3_600_000)h" }
        if ms % 60_000 == 0, ms > 0 { return "\(ms / 60_000)m" }
        if ms % 1000 == 0 { return "\(ms / 1000)s" }
        return "\(ms)ms"
    }

    /// The whole duration in nanoseconds (what NIO's `TimeAmount` and monotonic clocks count in).
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    public var milliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }

    public var seconds: Double {
        Double(milliseconds) / 1000
    }
}

