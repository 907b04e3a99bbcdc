// apus submit / apus tasks: asynchronous tasks from the command line (see docs/async-tasks.md).
import ApusCore
import ArgumentParser
import Foundation
import NIOHTTP1

/// A task as the API shows it (the fields the tables use; --json prints the API's JSON as it is).
struct TaskInfo: Decodable {
    var id: String
    var function: String
    var state: String
    var path: String
    var method: String
    var priority: Int
    var attempts: Int
    var version: Int?
    var instance: String?
    var createdAt: Date
    var startedAt: Date?
    var finishedAt: Date?
    var nextAttemptAt: Date?
    var durationSeconds: Double?
    var statusCode: Int?
    var result: String?
    var resultBase64: String?
    var error: String?
    var progress: Double?
    var progressMessage: String?
    var idempotencyKey: String?
    var callbackURL: String?
    var callbackState: String?
    var cancelRequested: Bool?
    var deadLetter: Bool
    var statusURL: String
}

struct TaskListingReply: Decodable {
    var tasks: [TaskInfo]
}

func query(_ pairs: [(String, String?)]) -> String {
    var allowed = CharacterSet.urlQueryAllowed
    allowed.remove(charactersIn: "&=+?/")
    let parts = pairs.compactMap { key, value in
        value.map { "\(key)=\($0.addingPercentEncoding(withAllowedCharacters: allowed) ?? $0)" }
    }
    return parts.isEmpty ? "" : "?" + parts.joined(separator: "&")
}

func seconds(_ value: Double?) -> String {
    guard let value else { return "-" }
    return value < 10 ? String(format: "%.2fs", value) : String(format: "%.0fs", value)
}

struct Submit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Submit an asynchronous task to a function; prints its id once it is durable.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Function name.") var name: String
    @Option(help: "Payload, or @FILE to send a file's contents.") var data: String?
    @Option(help: "Path under the function the task calls (HTTP functions), e.g. /resize?w=100.") var path: String?
    @Option(help: "HTTP method (default POST); for gRPC functions the method /<service>/<method>.") var method: String?
    @Option(help: "Content-Type of the payload.") var contentType: String?
    @Option(help: "Idempotency key: submitting the same key again returns the same task.") var idempotencyKey: String?
    @Option(help: "URL that receives the outcome as a JSON POST.") var callback: String?
    @Option(parsing: .unconditional, help: "Priority (-1000…1000; higher runs first).") var priority: Int?
    @Flag(help: "Wait until the task finishes and print it.") var wait = false

    func run() async throws {
        try await Apus.guarded {
            var body = Data()
            if let data {
                if data.hasPrefix("@") {
                    guard let contents = FileManager.default.contents(atPath: String(data.dropFirst())) else {
                        throw CLIError("cannot read \(data.dropFirst())")
                    }
                    body = contents
                } else {
                    body = Data(data.utf8)
                }
            }
            let suffix = query([("path", path), ("method", method), ("idempotency_key", idempotencyKey), ("callback", callback),
                                ("priority", priority.map(String.init))])
            let client = global.client
            let reply = try await client.send(.POST, url: client.base + "/v1/functions/\(name)/tasks\(suffix)",
                                              headers: [("Content-Type", contentType ?? "application/octet-stream")], body: body)
            guard (200..<300).contains(reply.status) else { throw CLIError(APIClient.errorMessage(reply)) }
            struct Receipt: Decodable { var id: String; var status_url: String; var created: Bool }
            let receipt = try client.decode(Receipt.self, reply.body)
            if wait {
                while true {
                    let data = try await client.call(.GET, "/v1/tasks/\(receipt.id)")
                    let task = try client.decode(TaskInfo.self, data)
                    if !["queued", "running"].contains(task.state) {
                        if global.json { return global.printJSON(data) }
                        return TaskGet.show(task)
                    }
                    try await Task.sleep(for: .milliseconds(250))
                }
            }
            if global.json { return global.printJSON(reply.body) }
            out(receipt.id)
            if !receipt.created { FileHandle.standardError.write(Data("apus: the idempotency key matched an earlier task\n".utf8)) }
        }
    }
}

struct Tasks: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List, inspect and cancel asynchronous tasks.",
        subcommands: [TaskList.self, TaskGet.self, TaskCancel.self, TaskDeadLetter.self],
        defaultSubcommand: TaskList.self)
}

struct TaskFilters: ParsableArguments {
    @Option(help: "Only this function's tasks.") var function: String?
    @Option(help: "Only these states (comma-separated: queued, running, succeeded, failed, cancelled, timed_out, expired, dead).") var state: String?
    @Option(help: "Submitted at or after (ISO 8601, epoch seconds, or a duration ago such as 10m).") var since: String?
    @Option(help: "Submitted before (same forms as --since).") var until: String?
    @Option(parsing: .unconditional, help: "At most this many (newest first).") var limit = 50
}

func renderTasks(_ tasks: [TaskInfo]) -> String {
    guard !tasks.isEmpty else { return "no tasks" }
    var table = Table("ID", "FUNCTION", "STATE", "ATTEMPTS", "SUBMITTED", "DURATION", "DETAIL")
    for task in tasks {
        var detail = task.error ?? ""
        if task.state == "running" {
            detail = task.progress.map { String(format: "%.0f%%", $0 * 100) } ?? ""
            if let message = task.progressMessage { detail += (detail.isEmpty ? "" : " ") + message }
            if task.cancelRequested == true { detail = "cancelling" }
        } else if task.state == "queued", let next = task.nextAttemptAt {
            detail = "retry at \(ISO8601DateFormatter().string(from: next))"
        }
        table.add(task.id, task.function, task.state, String(task.attempts), age(task.createdAt), seconds(task.durationSeconds),
                  String(detail.prefix(80)))
    }
    return table.render()
}

struct TaskList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List tasks, newest first.")
    @OptionGroup var global: GlobalOptions
    @OptionGroup var filters: TaskFilters

    func run() async throws {
        try await Apus.guarded {
            let suffix = query([("function", filters.function), ("state", filters.state), ("since", filters.since),
                                ("until", filters.until), ("limit", String(filters.limit))])
            let data = try await global.client.call(.GET, "/v1/tasks\(suffix)")
            if global.json { return global.printJSON(data) }
            out(renderTasks(try global.client.decode(TaskListingReply.self, data).tasks))
        }
    }
}

struct TaskDeadLetter: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dead-letter", abstract: "List tasks that failed, timed out or expired after their retries.")
    @OptionGroup var global: GlobalOptions
    @Option(help: "Only this function's tasks.") var function: String?
    @Option(parsing: .unconditional, help: "At most this many (newest first).") var limit = 50

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/tasks/dead-letter\(query([("function", function), ("limit", String(limit))]))")
            if global.json { return global.printJSON(data) }
            out(renderTasks(try global.client.decode(TaskListingReply.self, data).tasks))
        }
    }
}

struct TaskGet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "get", abstract: "Show one task: state, attempts, result or error.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Task id.") var id: String

    static func show(_ task: TaskInfo) {
        let iso = ISO8601DateFormatter()
        out("id:        \(task.id)")
        out("function:  \(task.function)\(task.version.map { " v\($0)" } ?? "")  \(task.method) \(task.path)")
        out("state:     \(task.state)\(task.deadLetter ? " (dead letter)" : "")\(task.cancelRequested == true ? " (cancelling)" : "")")
        out("attempts:  \(task.attempts)\(task.instance.map { "  last on instance \($0)" } ?? "")")
        out("submitted: \(iso.string(from: task.createdAt))")
        if let started = task.startedAt { out("started:   \(iso.string(from: started))") }
        if let finished = task.finishedAt, !["queued", "running"].contains(task.state) {
            out("finished:  \(iso.string(from: finished))  (\(seconds(task.durationSeconds)))")
        }
        if let next = task.nextAttemptAt { out("next try:  \(iso.string(from: next))") }
        if let progress = task.progress { out("progress:  \(String(format: "%.0f%%", progress * 100))\(task.progressMessage.map { " \($0)" } ?? "")") }
        if let key = task.idempotencyKey { out("key:       \(key)") }
        if let callback = task.callbackURL { out("callback:  \(callback)\(task.callbackState.map { " (\($0))" } ?? "")") }
        if let error = task.error { out("error:     \(error)") }
        if let result = task.result { out("result:\n\(result)") }
        if let result = task.resultBase64 { out("result (base64):\n\(result)") }
    }

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/tasks/\(id)")
            if global.json { return global.printJSON(data) }
            Self.show(try global.client.decode(TaskInfo.self, data))
        }
    }
}

struct TaskCancel: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cancel", abstract: "Cancel a queued or running task.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Task id.") var id: String

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.DELETE, "/v1/tasks/\(id)")
            if global.json { return global.printJSON(data) }
            let task = try global.client.decode(TaskInfo.self, data)
            out(task.state == "cancelled" ? "cancelled \(task.id)" : "cancelling \(task.id) (running; it stops at its next progress report or is torn down)")
        }
    }
}
