import ApusCore
import Foundation

/// One attempt of a task, placed on an instance.
public struct TaskInvocation: Sendable {
    public var task: TaskRecord
    public var payload: [UInt8]
    public var attempt: Int
    public var version: FunctionVersion
    public var instanceID: String
    /// Where the instance serves.
    public var endpoint: InstanceEndpoint
    public var port: Int { endpoint.port }
    /// Seconds the attempt may still run.
    public var timeout: Double
    /// Where the function posts progress (and heartbeats) for this task.
    public var progressURL: String
    /// Largest result kept; a larger one fails the task.
    public var resultLimit: Int

    public init(task: TaskRecord, payload: [UInt8], attempt: Int, version: FunctionVersion, instanceID: String, endpoint: InstanceEndpoint,
                timeout: Double, progressURL: String, resultLimit: Int) {
        self.task = task
        self.payload = payload
        self.attempt = attempt
        self.version = version
        self.instanceID = instanceID
        self.endpoint = endpoint
        self.timeout = timeout
        self.progressURL = progressURL
        self.resultLimit = resultLimit
    }
}

/// What an attempt produced.
public struct InvocationResult: Sendable {
    public var outcome: TaskStateMachine.Outcome
    public var result: [UInt8]?
    public var contentType: String?
    /// HTTP status, or gRPC status.
    public var statusCode: Int?
    /// The instance could not be reached at all (it should leave service).
    public var unreachable: Bool

    public init(outcome: TaskStateMachine.Outcome, result: [UInt8]? = nil, contentType: String? = nil, statusCode: Int? = nil,
                unreachable: Bool = false) {
        self.outcome = outcome
        self.result = result
        self.contentType = contentType
        self.statusCode = statusCode
        self.unreachable = unreachable
    }

    static func resultTooLarge(_ limit: Int, statusCode: Int?) -> InvocationResult {
        InvocationResult(outcome: .failed("result exceeds the task result limit of \(limit) bytes (--task-result-limit); not stored", retryable: false),
                         statusCode: statusCode)
    }
}

/// Sends one attempt to an instance in the function's protocol. Cancelling the calling Swift task tears the
/// invocation down (the connection to the instance is closed).
public protocol TaskInvoker: Sendable {
    func invoke(_ invocation: TaskInvocation) async -> InvocationResult
}
