/// Memory sizes in the Kubernetes style: `256Mi`, `1Gi`, `512M`, `1024Ki`, or plain bytes.
public enum ByteSize {
    private static let units: [(suffix: String, factor: Int64)] = [
        ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40),
        ("K", 1_000), ("M", 1_000_000), ("G", 1_000_000_000), ("T", 1_000_000_000_000),
    ]

    public static func parse(_ text: String) -> Int64? {
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            guard let value = Int64(text.dropLast(suffix.count)), value >= 0 else { return nil }
            let (product, overflow) = value.multipliedReportingOverflow(by: factor)
            return overflow ? nil : product
        }
        guard let value = Int64(text), value >= 0 else { return nil }
        return value
    }

    public static func format(_ bytes: Int64) -> String {
        for (suffix, factor) in units.prefix(4).reversed() where bytes >= factor && bytes % factor == 0 {
            return "\(bytes / factor)\(suffix)"
        }
        return "\(bytes)"
    }
}
