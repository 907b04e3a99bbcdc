import ApusCore
import Foundation

/// One task as stored: what was submitted (without the payload, which is read only to dispatch), where it is in
/// its life, and its outcome.
public struct TaskRecord: Sendable, Equatable {
    public var id: String
    public var function: String
    public var pinnedVersion: Int?
    public var kind: TaskSubmission.Kind
    public var method: String
    public var path: String
    public var contentType: String?
    public var idempotencyKey: String?
    public var callbackURL: String?
    public var priority: Int
    /// Submission order (FIFO within a priority).
    public var seq: Int64
    public var requestID: String?
    public var payloadBytes: Int

    public var state: TaskState
    public var attempt: Int
    public var throttles: Int
    public var createdAt: Double
    public var updatedAt: Double
    public var notBefore: Double
    public var startedAt: Double?
    public var finishedAt: Double?
    public var instanceID: String?
    /// The version that ran the latest attempt.
    public var version: Int?
    public var result: [UInt8]?
    public var resultContentType: String?
    /// HTTP status (or gRPC status) of the latest attempt's answer.
    public var statusCode: Int?
    public var error: String?
    public var progress: Double?
    public var progressMessage: String?
    public var heartbeatAt: Double?
    /// `pending`, `delivered` or `failed` when a callback URL applies.
    public var callbackState: String?
    public var callbackAttempts: Int
    public var cancelRequested: Bool

    public init(id: String, submission: TaskSubmission, seq: Int64, now: Double) {
        self.id = id
        function = submission.function
        pinnedVersion = submission.pinnedVersion
        kind = submission.kind
        method = submission.method
        path = submission.path
        contentType = submission.contentType
        idempotencyKey = submission.idempotencyKey
        callbackURL = submission.callbackURL
        priority = submission.priority
        self.seq = seq
        requestID = submission.requestID
        payloadBytes = submission.payload.count
        state = .queued
        attempt = 0
        throttles = 0
        createdAt = now
        updatedAt = now
        notBefore = 0
        callbackAttempts = 0
        cancelRequested = false
    }

    /// The state machine's view of it.
    public var entry: TaskStateMachine.Entry {
        TaskStateMachine.Entry(id: id, function: function, priority: priority, seq: seq, createdAt: createdAt,
                               attempt: attempt, throttles: throttles, notBefore: notBefore)
    }

    /// Seconds the latest attempt ran (nil until it finished).
    public var duration: Double? {
        guard let startedAt, let finishedAt else { return nil }
        return max(0, finishedAt - startedAt)
    }
}

/// The JSON form of a task in the API and in callbacks.
public struct TaskView: Codable, Sendable {
    public var id: String
    public var function: String
    public var state: String
    public var kind: String
    public var method: String
    public var path: String
    public var priority: Int
    public var attempts: Int
    public var version: Int?
    public var instance: String?
    public var createdAt: Date
    public var updatedAt: Date
    public var startedAt: Date?
    public var finishedAt: Date?
    public var nextAttemptAt: Date?
    public var durationSeconds: Double?
    /// Seconds from submission to the start of the latest attempt.
    public var queueSeconds: Double?
    public var statusCode: Int?
    /// The result as text when it is UTF-8, else in `resultBase64`.
    public var result: String?
    public var resultBase64: String?
    public var resultContentType: String?
    public var error: String?
    public var progress: Double?
    public var progressMessage: String?
    public var idempotencyKey: String?
    public var callbackURL: String?
    public var callbackState: String?
    public var cancelRequested: Bool?
    public var deadLetter: Bool
    public var payloadBytes: Int
    public var statusURL: String

    public init(_ record: TaskRecord, statusURL: String) {
        id = record.id
        function = record.function
        state = record.state.rawValue
        kind = record.kind.rawValue
        method = record.method
        path = record.path
        priority = record.priority
        attempts = record.attempt
        version = record.version
        instance = record.instanceID
        createdAt = Date(timeIntervalSince1970: record.createdAt)
        updatedAt = Date(timeIntervalSince1970: record.updatedAt)
        startedAt = record.startedAt.map { Date(timeIntervalSince1970: $0) }
        finishedAt = record.finishedAt.map { Date(timeIntervalSince1970: $0) }
        if record.state == .queued, record.notBefore > record.createdAt {
            nextAttemptAt = Date(timeIntervalSince1970: record.notBefore)
        }
        durationSeconds = record.duration
        queueSeconds = record.startedAt.map { max(0, $0 - record.createdAt) }
        statusCode = record.statusCode
        if let bytes = record.result {
            if let text = String(validating: bytes, as: UTF8.self) {
                result = text
            } else {
                resultBase64 = Data(bytes).base64EncodedString()
            }
        }
        resultContentType = record.resultContentType
        error = record.error
        progress = record.progress
        progressMessage = record.progressMessage
        idempotencyKey = record.idempotencyKey
        callbackURL = record.callbackURL
        callbackState = record.callbackState
        cancelRequested = record.cancelRequested && !record.state.isTerminal ? true : nil
        deadLetter = record.state.isDead
        payloadBytes = record.payloadBytes
        self.statusURL = statusURL
    }
}
