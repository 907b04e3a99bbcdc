import ApusCore
import Foundation
import GRDB

/// The durable task store: its own SQLite file (`<data-dir>/tasks.sqlite`, WAL, `synchronous=FULL`) apart from the
/// control plane's store, so that task traffic and schema never meet its migrations. Reads go through GRDB's
/// `DatabasePool` readers; every write goes through `GroupCommitWriter`, which puts the writes that arrive while
/// one transaction commits into the next one (group commit): a submission returns only once its transaction is on
/// disk, and concurrent submitters share the cost of each fsync.
public final class TaskStore: Sendable {
    private let database: DatabasePool
    private let writer: GroupCommitWriter
    public let path: String

    /// How commits reach the disk. `full` (the default) fsyncs the WAL on every commit: a task survives power loss
    /// once it is acknowledged. `normal` leaves the fsync to checkpoints: a task survives the process being killed
    /// (its commit is in the OS's cache) but not a power failure.
    public enum Durability: String, Sendable, CaseIterable {
        case full
        case normal
    }

    public init(path: String, durability: Durability = .full) throws(ApusError) {
        self.path = path
        do {
            var configuration = Configuration()
            configuration.busyMode = .timeout(10)
            let synchronous = durability == .full ? "FULL" : "NORMAL"
            configuration.prepareDatabase { db in
                try db.execute(sql: "PRAGMA synchronous = \(synchronous)")
            }
            database = try DatabasePool(path: path, configuration: configuration)
            try Self.migrator.migrate(database)
        } catch {
            throw ApusError(.internal, "cannot open task store \(path): \(error)")
        }
        writer = GroupCommitWriter(database: database)
    }

    private static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("tasks-v1") { db in
            try db.execute(sql: """
                CREATE TABLE tasks (
                    id TEXT PRIMARY KEY NOT NULL,
                    function TEXT NOT NULL,
                    pinned_version INTEGER,
                    kind TEXT NOT NULL,
                    method TEXT NOT NULL,
                    path TEXT NOT NULL,
                    content_type TEXT,
                    idempotency_key TEXT,
                    callback_url TEXT,
                    priority INTEGER NOT NULL,
                    seq INTEGER NOT NULL,
                    request_id TEXT,
                    payload BLOB NOT NULL,
                    payload_bytes INTEGER NOT NULL,
                    state TEXT NOT NULL,
                    attempt INTEGER NOT NULL,
                    throttles INTEGER NOT NULL,
                    created_at DOUBLE NOT NULL,
                    updated_at DOUBLE NOT NULL,
                    not_before DOUBLE NOT NULL,
                    started_at DOUBLE,
                    finished_at DOUBLE,
                    instance_id TEXT,
                    version INTEGER,
                    result BLOB,
                    result_content_type TEXT,
                    status_code INTEGER,
                    error TEXT,
                    progress DOUBLE,
                    progress_message TEXT,
                    heartbeat_at DOUBLE,
                    callback_state TEXT,
                    callback_attempts INTEGER NOT NULL DEFAULT 0,
                    cancel_requested INTEGER NOT NULL DEFAULT 0
                );
                CREATE UNIQUE INDEX tasks_idempotency ON tasks(function, idempotency_key) WHERE idempotency_key IS NOT NULL;
                CREATE INDEX tasks_state ON tasks(state);
                CREATE INDEX tasks_created ON tasks(created_at);
                CREATE INDEX tasks_function_created ON tasks(function, created_at);
                CREATE INDEX tasks_finished ON tasks(finished_at) WHERE finished_at IS NOT NULL;
                CREATE INDEX tasks_callbacks ON tasks(callback_state) WHERE callback_state = 'pending';
                """)
        }
        return migrator
    }

    static let columns = """
        id, function, pinned_version, kind, method, path, content_type, idempotency_key, callback_url, priority, seq,
        request_id, payload_bytes, state, attempt, throttles, created_at, updated_at, not_before, started_at, finished_at,
        instance_id, version, result, result_content_type, status_code, error, progress, progress_message, heartbeat_at,
        callback_state, callback_attempts, cancel_requested
        """

    static func record(_ row: Row) -> TaskRecord {
        var record = TaskRecord(
            id: row["id"],
            submission: TaskSubmission(
                function: row["function"], pinnedVersion: row["pinned_version"],
                kind: TaskSubmission.Kind(rawValue: row["kind"]) ?? .http, method: row["method"], path: row["path"],
                contentType: row["content_type"], payload: [], idempotencyKey: row["idempotency_key"],
                callbackURL: row["callback_url"], priority: row["priority"], requestID: row["request_id"]),
            seq: row["seq"], now: row["created_at"])
        record.payloadBytes = row["payload_bytes"]
        record.state = TaskState(rawValue: row["state"]) ?? .failed
        record.attempt = row["attempt"]
        record.throttles = row["throttles"]
        record.updatedAt = row["updated_at"]
        record.notBefore = row["not_before"]
        record.startedAt = row["started_at"]
        record.finishedAt = row["finished_at"]
        record.instanceID = row["instance_id"]
        record.version = row["version"]
        record.result = (row["result"] as Data?).map { [UInt8]($0) }
        record.resultContentType = row["result_content_type"]
        record.statusCode = row["status_code"]
        record.error = row["error"]
        record.progress = row["progress"]
        record.progressMessage = row["progress_message"]
        record.heartbeatAt = row["heartbeat_at"]
        record.callbackState = row["callback_state"]
        record.callbackAttempts = row["callback_attempts"]
        record.cancelRequested = row["cancel_requested"]
        return record
    }

    // MARK: writing (group commit)

    /// Writes a new task, or — when its idempotency key was used before for the function — returns that task
    /// instead (`created` false). Returns once the transaction is durable.
    public func insert(_ record: TaskRecord, payload: [UInt8]) async throws(ApusError) -> (record: TaskRecord, created: Bool) {
        try await writer.perform { db in
            if let key = record.idempotencyKey,
               let row = try Row.fetchOne(db.cachedStatement(sql: "SELECT \(Self.columns) FROM tasks WHERE function = ? AND idempotency_key = ?"),
                                          arguments: [record.function, key]) {
                return (Self.record(row), false)
            }
            let statement = try db.cachedStatement(
                sql: """
                    INSERT INTO tasks (id, function, pinned_version, kind, method, path, content_type, idempotency_key, callback_url,
                        priority, seq, request_id, payload, payload_bytes, state, attempt, throttles, created_at, updated_at, not_before)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, 0, ?, ?, 0)
                    """)
            try statement.execute(
                arguments: [record.id, record.function, record.pinnedVersion, record.kind.rawValue, record.method, record.path,
                            record.contentType, record.idempotencyKey, record.callbackURL, record.priority, record.seq,
                            record.requestID, Data(payload), payload.count, record.createdAt, record.updatedAt])
            return (record, true)
        }
    }

    /// A change to a stored task.
    public enum Update: Sendable {
        case running(id: String, attempt: Int, startedAt: Double)
        case placed(id: String, instanceID: String, version: Int)
        case requeued(id: String, attempt: Int, throttles: Int, notBefore: Double, error: String, at: Double)
        case finished(id: String, state: TaskState, at: Double, error: String?, result: [UInt8]?, resultContentType: String?,
                      statusCode: Int?, callbackPending: Bool)
        case progress(id: String, progress: Double?, message: String?, at: Double)
        case cancelRequested(id: String, at: Double)
        case callback(id: String, state: String, attempts: Int)
    }

    /// Applies updates in one transaction; returns once it is durable.
    public func apply(_ updates: [Update]) async throws(ApusError) {
        guard !updates.isEmpty else { return }
        try await writer.perform { db in
            for update in updates { try Self.apply(update, db) }
        }
    }

    private static func apply(_ update: Update, _ db: Database) throws {
        switch update {
        case .running(let id, let attempt, let startedAt):
            try db.execute(sql: """
                UPDATE tasks SET state = 'running', attempt = ?, started_at = ?, finished_at = NULL, heartbeat_at = ?, updated_at = ?,
                    instance_id = NULL WHERE id = ?
                """, arguments: [attempt, startedAt, startedAt, startedAt, id])
        case .placed(let id, let instanceID, let version):
            try db.execute(sql: "UPDATE tasks SET instance_id = ?, version = ? WHERE id = ?", arguments: [instanceID, version, id])
        case .requeued(let id, let attempt, let throttles, let notBefore, let error, let at):
            try db.execute(sql: """
                UPDATE tasks SET state = 'queued', attempt = ?, throttles = ?, not_before = ?, error = ?, updated_at = ?, finished_at = ?
                    WHERE id = ?
                """, arguments: [attempt, throttles, notBefore, error, at, at, id])
        case .finished(let id, let state, let at, let error, let result, let contentType, let statusCode, let callbackPending):
            try db.execute(sql: """
                UPDATE tasks SET state = ?, finished_at = ?, updated_at = ?, error = ?, result = ?, result_content_type = ?,
                    status_code = COALESCE(?, status_code), callback_state = ?
                    WHERE id = ?
                """, arguments: [state.rawValue, at, at, error, result.map { Data($0) }, contentType, statusCode,
                                 callbackPending ? "pending" : nil, id])
        case .progress(let id, let progress, let message, let at):
            try db.execute(sql: """
                UPDATE tasks SET progress = COALESCE(?, progress), progress_message = COALESCE(?, progress_message), heartbeat_at = ?,
                    updated_at = ? WHERE id = ?
                """, arguments: [progress, message, at, at, id])
        case .cancelRequested(let id, let at):
            try db.execute(sql: "UPDATE tasks SET cancel_requested = 1, updated_at = ? WHERE id = ?", arguments: [at, id])
        case .callback(let id, let state, let attempts):
            try db.execute(sql: "UPDATE tasks SET callback_state = ?, callback_attempts = ? WHERE id = ?", arguments: [state, attempts, id])
        }
    }

    /// Deletes finished tasks older than `before`; returns how many went.
    public func purge(finishedBefore before: Double) async throws(ApusError) -> Int {
        try await writer.perform { db in
            try db.execute(sql: "DELETE FROM tasks WHERE finished_at < ? AND state NOT IN ('queued', 'running')", arguments: [before])
            return db.changesCount
        }
    }

    // MARK: reading

    private func read<T>(_ body: (Database) throws -> T) throws(ApusError) -> T {
        do {
            return try database.read(body)
        } catch {
            throw ApusError(.internal, "task store read failed: \(error)")
        }
    }

    public func record(_ id: String) throws(ApusError) -> TaskRecord? {
        try read { db in
            try Row.fetchOne(db, sql: "SELECT \(Self.columns) FROM tasks WHERE id = ?", arguments: [id]).map(Self.record)
        }
    }

    public func payload(of id: String) throws(ApusError) -> [UInt8]? {
        try read { db in
            (try Data.fetchOne(db, sql: "SELECT payload FROM tasks WHERE id = ?", arguments: [id])).map { [UInt8]($0) }
        }
    }

    /// Queued and running tasks (at start-up: the work to resume).
    public func active() throws(ApusError) -> [TaskRecord] {
        try read { db in
            try Row.fetchAll(db, sql: "SELECT \(Self.columns) FROM tasks WHERE state IN ('queued', 'running') ORDER BY seq").map(Self.record)
        }
    }

    public func pendingCallbacks() throws(ApusError) -> [TaskRecord] {
        try read { db in
            try Row.fetchAll(db, sql: "SELECT \(Self.columns) FROM tasks WHERE callback_state = 'pending'").map(Self.record)
        }
    }

    public func maxSeq() throws(ApusError) -> Int64 {
        try read { db in try Int64.fetchOne(db, sql: "SELECT MAX(seq) FROM tasks") ?? 0 }
    }

    public struct Filter: Sendable {
        public var function: String?
        public var states: [TaskState]
        public var since: Double?
        public var until: Double?
        public var limit: Int

        public init(function: String? = nil, states: [TaskState] = [], since: Double? = nil, until: Double? = nil, limit: Int = 100) {
            self.function = function
            self.states = states
            self.since = since
            self.until = until
            self.limit = limit
        }
    }

    /// Tasks matching the filter, newest first (by submission time).
    public func list(_ filter: Filter) throws(ApusError) -> [TaskRecord] {
        var conditions: [String] = []
        var arguments: [any DatabaseValueConvertible] = []
        if let function = filter.function {
            conditions.append("function = ?")
            arguments.append(function)
        }
        if !filter.states.isEmpty {
            conditions.append("state IN (\(filter.states.map { _ in "?" }.joined(separator: ", ")))")
            arguments += filter.states.map(\.rawValue)
        }
        if let since = filter.since {
            conditions.append("created_at >= ?")
            arguments.append(since)
        }
        if let until = filter.until {
            conditions.append("created_at < ?")
            arguments.append(until)
        }
        let whereClause = conditions.isEmpty ? "" : "WHERE " + conditions.joined(separator: " AND ")
        let sql = "SELECT \(Self.columns) FROM tasks \(whereClause) ORDER BY created_at DESC, seq DESC LIMIT \(max(1, filter.limit))"
        let statementArguments = StatementArguments(arguments) ?? StatementArguments()
        return try read { db in try Row.fetchAll(db, sql: sql, arguments: statementArguments).map(Self.record) }
    }

    /// Counts by state (for status displays and tests).
    public func counts(function: String? = nil) throws(ApusError) -> [String: Int] {
        try read { db in
            let rows = if let function {
                try Row.fetchAll(db, sql: "SELECT state, COUNT(*) AS n FROM tasks WHERE function = ? GROUP BY state", arguments: [function])
            } else {
                try Row.fetchAll(db, sql: "SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
            }
            var counts: [String: Int] = [:]
            for row in rows { counts[row["state"]] = row["n"] }
            return counts
        }
    }

    public func close() {
        writer.stop()
    }
}

/// Carries a job's value from the writer thread to its caller (written before the caller is resumed).
final class ResultBox<T>: @unchecked Sendable {
    var value: T?
}

/// Runs write jobs on one dedicated thread (SQLite writes block; they stay off the cooperative pool), putting every
/// job queued while a transaction commits into the next transaction; callers hear after the commit. A job that
/// throws does not undo the others: its jobs are single statements or independent updates, and SQLite undoes a
/// failed statement by itself.
final class GroupCommitWriter: @unchecked Sendable {
    private struct Job {
        var body: (Database) throws -> Void
        var done: (Result<Void, any Error>) -> Void
    }

    private let condition = NSCondition()
    private var pending: [Job] = []
    private var stopped = false
    private let database: DatabasePool
    static let maxBatch = 2000

    init(database: DatabasePool) {
        self.database = database
        let thread = Thread { [self] in loop() }
        thread.name = "apus-task-store-writer"
        thread.start()
    }

    func stop() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
    }

    /// Runs `body` in the next group transaction and returns its value once that transaction is committed.
    func perform<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws(ApusError) -> T {
        let result: Result<T, ApusError> = await withCheckedContinuation { continuation in
            let box = ResultBox<T>()
            let job = Job(body: { db in box.value = try body(db) }, done: { outcome in
                switch outcome {
                case .success: continuation.resume(returning: .success(box.value!))
                case .failure(let error as ApusError): continuation.resume(returning: .failure(error))
                case .failure(let error): continuation.resume(returning: .failure(ApusError(.internal, "task store write failed: \(error)")))
                }
            })
            condition.lock()
            if stopped {
                condition.unlock()
                continuation.resume(returning: .failure(ApusError(.unavailable, "the task store is closed")))
                return
            }
            pending.append(job)
            condition.signal()
            condition.unlock()
        }
        return try result.get()
    }

    private func loop() {
        while true {
            condition.lock()
            while pending.isEmpty && !stopped { condition.wait() }
            if pending.isEmpty && stopped {
                condition.unlock()
                return
            }
            let batch: [Job]
            if pending.count > Self.maxBatch {
                batch = Array(pending.prefix(Self.maxBatch))
                pending.removeFirst(Self.maxBatch)
            } else {
                batch = pending
                pending = []
            }
            condition.unlock()
            var outcomes = [Result<Void, any Error>](repeating: .success(()), count: batch.count)
            do {
                try database.writeWithoutTransaction { db in
                    try db.inTransaction(.immediate) {
                        for (index, job) in batch.enumerated() {
                            do {
                                try job.body(db)
                            } catch {
                                outcomes[index] = .failure(error)
                            }
                        }
                        return .commit
                    }
                }
            } catch {
                outcomes = Array(repeating: .failure(error), count: batch.count)
            }
            for (index, job) in batch.enumerated() { job.done(outcomes[index]) }
        }
    }
}
