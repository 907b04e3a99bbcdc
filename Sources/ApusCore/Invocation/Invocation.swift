/// The protocol-neutral head of a request, as an edge hands it to the middle: which function (and version, if
/// pinned), what is called, and by when. Headers and body stay with the edge as opaque bytes and pass through to
/// the instance unparsed.
public struct Invocation: Sendable {
    public var requestID: String
    public var function: String
    /// Set when the caller pinned a version (e.g. `X-Apus-Version`).
    public var pinnedVersion: Int?
    /// HTTP method (or, for RPC edges later, the RPC method name).
    public var method: String
    /// Path as the instance should see it (function prefix removed), query included.
    public var path: String
    /// The protocol the caller speaks: the function must serve it (the edge relays bytes, it does not convert).
    public var callerProtocol: FunctionManifest.WireProtocol
    /// The time the caller gives the call (`grpc-timeout`, a Thrift header timeout), if it said; the function's
    /// `timeout` caps it.
    public var callerBudget: Duration?
    /// Set once the version (and so its timeout) is known.
    public var deadline: ContinuousClock.Instant?

    public init(
        requestID: String, function: String, pinnedVersion: Int?, method: String, path: String,
        callerProtocol: FunctionManifest.WireProtocol = .http, callerBudget: Duration? = nil,
        deadline: ContinuousClock.Instant? = nil
    ) {
        self.requestID = requestID
        self.function = function
        self.pinnedVersion = pinnedVersion
        self.method = method
        self.path = path
        self.callerProtocol = callerProtocol
        self.callerBudget = callerBudget
        self.deadline = deadline
    }
}

/// Short random identifiers for instances and the like.
public enum Identifier {
    public static func make(prefix: String = "", length: Int = 16) -> String {
        let alphabet = Array("0123456789abcdefghijklmnopqrstuvwxyz".utf8)
        var bytes = Array(prefix.utf8)
        bytes.reserveCapacity(bytes.count + length)
        for _ in 0..<length { bytes.append(alphabet[Int.random(in: 0..<alphabet.count)]) }
        return String(decoding: bytes, as: UTF8.self)
    }
}
