import Foundation

/// What an edge hands over to make an asynchronous task of a call (`X-Apus-Invocation: async`, `/async/<fn>/…`,
/// gRPC metadata `apus-invocation: async`, a Thrift oneway call to a function with `async:`). The edge knows nothing
/// else about tasks: it gets an id back once the task is durable, and answers the caller with it.
public struct TaskSubmission: Sendable {
    /// How the task reaches the function's instances.
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// An HTTP request (`method` to `path`, body `payload`).
        case http
        /// A unary gRPC call: `method` is `/pkg.Service/Method`, `payload` the length-prefixed request message(s).
        case grpc
        /// A Thrift oneway message: `payload` is the bare message in the caller's protocol, `method` its name.
        case thrift
    }

    public var function: String
    public var pinnedVersion: Int?
    public var kind: Kind
    public var method: String
    /// HTTP: the path (and query) the instance sees.
    public var path: String
    public var contentType: String?
    public var payload: [UInt8]
    /// Caller-chosen key: a second submission with the same key (for the same function) returns the first task.
    public var idempotencyKey: String?
    /// Receives the outcome as a JSON POST when the task finishes.
    public var callbackURL: String?
    /// Higher runs first; equal priorities run in submission order.
    public var priority: Int
    /// The request that submitted it (for logs).
    public var requestID: String?

    public init(function: String, pinnedVersion: Int? = nil, kind: Kind = .http, method: String = "POST", path: String = "/",
                contentType: String? = nil, payload: [UInt8], idempotencyKey: String? = nil, callbackURL: String? = nil,
                priority: Int = 0, requestID: String? = nil) {
        self.function = function
        self.pinnedVersion = pinnedVersion
        self.kind = kind
        self.method = method
        self.path = path
        self.contentType = contentType
        self.payload = payload
        self.idempotencyKey = idempotencyKey
        self.callbackURL = callbackURL
        self.priority = priority
        self.requestID = requestID
    }

    /// Idempotency keys: 1–128 characters of A–Z, a–z, 0–9 and `. _ : -`.
    public static func validateIdempotencyKey(_ key: String) throws(ApusError) {
        let valid = (1...128).contains(key.utf8.count) && key.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: ":") || byte == UInt8(ascii: "-")
        }
        guard valid else {
            throw ApusError(.badRequest, "idempotency key must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-' (got \"\(key.prefix(140))\")")
        }
    }

    /// Priorities run from -1000 to 1000.
    public static func parsePriority(_ text: String) throws(ApusError) -> Int {
        guard let value = Int(text.trimmingCharacters(in: .whitespaces)), (-1000...1000).contains(value) else {
            throw ApusError(.badRequest, "priority must be an integer from -1000 to 1000 (got \"\(text.prefix(40))\")")
        }
        return value
    }
}

/// The answer to a submission: the task's id and where to ask about it.
public struct TaskReceipt: Sendable {
    public var id: String
    /// False when an idempotency key matched an earlier task (this is that task).
    public var created: Bool
    /// `/v1/tasks/<id>` on the control API.
    public var statusPath: String
    /// The full status URL, when the control API's address is known.
    public var statusURL: String

    public init(id: String, created: Bool, statusPath: String, statusURL: String) {
        self.id = id
        self.created = created
        self.statusPath = statusPath
        self.statusURL = statusURL
    }

    /// `{"id":"…","status_url":"…","created":true}`.
    public var jsonBody: String {
        "{\"id\":\(ApusError.jsonString(id)),\"status_url\":\(ApusError.jsonString(statusURL)),\"created\":\(created)}"
    }
}

/// Turns submissions into durable tasks. The gateway is given one; `ApusTasks.TaskManager` is the implementation.
public protocol AsyncTaskSubmitter: Sendable {
    /// Largest payload accepted, in bytes.
    var maxPayloadBytes: Int { get }
    /// Returns once the task is durable (written to the task store).
    func submit(_ submission: TaskSubmission) async throws(ApusError) -> TaskReceipt
}
