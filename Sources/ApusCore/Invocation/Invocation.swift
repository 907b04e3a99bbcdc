import Foundation

/// The protocol-neutral request an edge hands to the middle: which function, which version if pinned,
/// routing metadata, a deadline, and a body that stays opaque bytes.
public struct Invocation: Sendable {
    public var requestID: String
    public var function: String
    /// Set when the caller pinned a version (e.g. `X-Apus-Version`).
    public var pinnedVersion: Int?
    public var method: String
    /// Path as the instance should see it (function prefix removed).
    public var path: String
    public var metadata: [(name: String, value: String)]
    public var deadline: ContinuousClock.Instant
    public var body: [UInt8]

    public init(
        requestID: String, function: String, pinnedVersion: Int?, method: String, path: String,
        metadata: [(name: String, value: String)], deadline: ContinuousClock.Instant, body: [UInt8]
    ) {
        self.requestID = requestID
        self.function = function
        self.pinnedVersion = pinnedVersion
        self.method = method
        self.path = path
        self.metadata = metadata
        self.deadline = deadline
        self.body = body
    }
}

/// Short random identifiers for requests and instances.
public enum Identifier {
    public static func make(prefix: String = "", length: Int = 16) -> String {
        let alphabet = Array("0123456789abcdefghijklmnopqrstuvwxyz")
        var out = prefix
        out.reserveCapacity(prefix.count + length)
        for _ in 0..<length { out.append(alphabet[Int.random(in: 0..<alphabet.count)]) }
        return out
    }
}
