import GRPCCore

extension Metadata {
    /// The caller's own metadata, to send back: every custom key as `echo-<key>` with its value unchanged (a binary
    /// `k-bin` comes back as binary `echo-k-bin`). Keys the protocol or the platform set are left out: `grpc-*`,
    /// pseudo-headers, `x-apus-*` (added by the gateway), `user-agent`, `te` and `content-type`.
    func echoed() -> Metadata {
        var echoed = Metadata()
        for (key, value) in self where Self.isCustom(key) {
            switch value {
            case .string(let string):
                echoed.addString(string, forKey: "echo-" + key)
            case .binary(let bytes):
                echoed.addBinary(bytes, forKey: "echo-" + key)
            }
        }
        return echoed
    }

    private static let reservedKeys: Set<String> = ["user-agent", "te", "content-type"]
    private static let reservedPrefixes = ["grpc-", ":", "x-apus-"]

    private static func isCustom(_ key: String) -> Bool {
        let key = key.lowercased()
        if reservedKeys.contains(key) { return false }
        return !reservedPrefixes.contains { key.hasPrefix($0) }
    }
}
