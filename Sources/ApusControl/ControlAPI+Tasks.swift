import ApusCore
import ApusTasks
import Foundation
import HTTPTypes
import Logging
import Hummingbird
import NIOCore

/// The task routes of the control API (IDL/apus-api.openapi.yaml, "tasks"): submit, query, list, cancel, the
/// dead-letter list, and the progress endpoint instances post to.
extension ControlAPI {
    static let idempotencyKeyField = HTTPField.Name("Idempotency-Key")!
    static let callbackField = HTTPField.Name("X-Apus-Callback-Url")!
    static let priorityField = HTTPField.Name("X-Apus-Priority")!
    static let versionField = HTTPField.Name("X-Apus-Version")!

    /// The JSON body of `POST /v1/tasks`.
    struct TaskRequest: Decodable {
        var function: String
        /// The payload as text, or base64 in `payloadBase64`.
        var payload: String?
        var payloadBase64: String?
        var path: String?
        var method: String?
        var contentType: String?
        var idempotencyKey: String?
        var callbackURL: String?
        var priority: Int?
        var version: Int?

        enum CodingKeys: String, CodingKey {
            case function, payload, payloadBase64 = "payload_base64", path, method, contentType = "content_type"
            case idempotencyKey = "idempotency_key", callbackURL = "callback_url", priority, version
        }
    }

    struct TaskListing: Encodable {
        var tasks: [TaskView]
        var count: Int
    }

    /// The answer to a submission: 202 (200 when an idempotency key matched an earlier task) with
    /// `{id, status_url, function, state, created}` and `Location: <status URL>`.
    static func receiptResponse(_ receipt: TaskReceipt, manager: TaskManager) throws -> Response {
        struct Receipt: Encodable {
            var id: String
            var statusURL: String
            var function: String
            var state: String
            var created: Bool
            enum CodingKeys: String, CodingKey { case id, statusURL = "status_url", function, state, created }
        }
        let record = try manager.task(receipt.id)
        var response = try json(Receipt(id: receipt.id, statusURL: receipt.statusURL, function: record.function,
                                        state: record.state.rawValue, created: receipt.created),
                                status: receipt.created ? .accepted : .ok)
        response.headers[.location] = receipt.statusURL
        return response
    }

    /// Parses `since`/`until`: ISO 8601, seconds since 1970, or a duration ago (`10m`).
    static func parseTime(_ text: String, _ name: String) throws(ApusError) -> Double {
        if let seconds = Double(text) { return seconds }
        let iso = ISO8601DateFormatter()
        if let date = iso.date(from: text) { return date.timeIntervalSince1970 }
        iso.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = iso.date(from: text) { return date.timeIntervalSince1970 }
        if let ago = Duration(humanReadable: text) { return Date().timeIntervalSince1970 - ago.seconds }
        throw ApusError(.badRequest, "\(name) must be an ISO 8601 time, seconds since 1970, or a duration ago such as 10m (got \"\(text.prefix(60))\")")
    }

    static func parseStates(_ text: String) throws(ApusError) -> [TaskState] {
        var states: [TaskState] = []
        for part in text.split(separator: ",") {
            let name = part.trimmingCharacters(in: .whitespaces)
            if name == "dead" || name == "dead-letter" {
                states += TaskState.allCases.filter(\.isDead)
            } else if let state = TaskState(rawValue: name) {
                states.append(state)
            } else {
                throw ApusError(.badRequest, "state must be one of \(TaskState.allCases.map(\.rawValue).joined(separator: ", ")) or dead (got \"\(name.prefix(40))\")")
            }
        }
        return states
    }

    func addTaskRoutes(to router: Router<ControlRequestContext>, tasks manager: TaskManager) {
        let limit = manager.maxPayloadBytes

        // Raw body: the payload as the function will get it.
        router.post("/v1/functions/:name/tasks") { request, context in
            let function = try name(context)
            if let length = request.headers[.contentLength].flatMap({ Int($0) }), length > limit {
                throw ApusError(.tooLarge, "task payload of \(length) bytes exceeds the limit of \(limit) bytes")
            }
            var request = request
            let body: ByteBuffer
            do {
                body = try await request.collectBody(upTo: limit)
            } catch {
                throw ApusError(.tooLarge, "task payload exceeds the limit of \(limit) bytes")
            }
            let query = request.uri.queryParameters
            var submission = TaskSubmission(function: function, payload: Array(body.readableBytesView))
            submission.contentType = request.headers[.contentType]
            if let key = request.headers[Self.idempotencyKeyField] ?? query["idempotency_key"].map(String.init) {
                submission.idempotencyKey = key
            }
            submission.callbackURL = request.headers[Self.callbackField] ?? query["callback"].map(String.init)
            if let priority = request.headers[Self.priorityField] ?? query["priority"].map(String.init) {
                submission.priority = try TaskSubmission.parsePriority(priority)
            }
            if let number = try VersionPin.parse(request.headers[Self.versionField] ?? query["version"].map(String.init), name: "version") {
                submission.pinnedVersion = number
            }
            if let path = query["path"] {
                guard path.hasPrefix("/") else { throw ApusError(.badRequest, "path must start with / (got \"\(path.prefix(100))\")") }
                submission.path = String(path)
            }
            if let method = query["method"] { submission.method = String(method) }
            if let kind = try? manager.kind(for: function) { submission.kind = kind }
            if submission.kind == .grpc, query["method"] == nil {
                throw ApusError(.badRequest, "a task for gRPC function \(function) needs ?method=/<service>/<method>")
            }
            if submission.kind == .grpc {
                // The body is one request message; the instance gets it length-prefixed.
                var framed: [UInt8] = [0]
                let n = UInt32(submission.payload.count)
                framed += [UInt8(n >> 24), UInt8((n >> 16) & 0xff), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)]
                submission.payload = framed + submission.payload
                submission.contentType = "application/grpc"
            }
            return try Self.receiptResponse(try await manager.submit(submission), manager: manager)
        }

        router.post("/v1/tasks") { request, _ in
            var request = request
            let body: ByteBuffer
            do {
                body = try await request.collectBody(upTo: limit * 4 / 3 + 4096)
            } catch {
                throw ApusError(.tooLarge, "task payload exceeds the limit of \(limit) bytes")
            }
            let parsed: TaskRequest
            do {
                parsed = try JSONDecoder().decode(TaskRequest.self, from: Data(buffer: body))
            } catch {
                throw ApusError(.badRequest, "body must be {\"function\": NAME, \"payload\": TEXT | \"payload_base64\": B64, \"path\", \"method\", \"idempotency_key\", \"callback_url\", \"priority\"}: \(error)")
            }
            var payload: [UInt8] = []
            if let b64 = parsed.payloadBase64 {
                guard let data = Data(base64Encoded: b64) else { throw ApusError(.badRequest, "payload_base64 is not valid base64") }
                payload = Array(data)
            } else if let text = parsed.payload {
                payload = Array(text.utf8)
            }
            var submission = TaskSubmission(
                function: parsed.function, pinnedVersion: parsed.version, method: parsed.method ?? "POST", path: parsed.path ?? "/",
                contentType: parsed.contentType, payload: payload, idempotencyKey: parsed.idempotencyKey,
                callbackURL: parsed.callbackURL, priority: parsed.priority ?? 0)
            if let priority = parsed.priority, !(-1000...1000).contains(priority) {
                throw ApusError(.badRequest, "priority must be an integer from -1000 to 1000 (got \(priority))")
            }
            if let path = parsed.path, !path.hasPrefix("/") { throw ApusError(.badRequest, "path must start with / (got \"\(path.prefix(100))\")") }
            if let kind = try? manager.kind(for: parsed.function) { submission.kind = kind }
            if submission.kind == .grpc {
                var framed: [UInt8] = [0]
                let n = UInt32(payload.count)
                framed += [UInt8(n >> 24), UInt8((n >> 16) & 0xff), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)]
                submission.payload = framed + payload
                submission.contentType = "application/grpc"
            }
            return try Self.receiptResponse(try await manager.submit(submission), manager: manager)
        }

        @Sendable func list(_ request: Request, deadOnly: Bool) throws -> Response {
            let query = request.uri.queryParameters
            var filter = TaskStore.Filter()
            if let function = query["function"] { filter.function = String(function) }
            if let state = query["state"] { filter.states = try Self.parseStates(String(state)) }
            if deadOnly { filter.states = TaskState.allCases.filter(\.isDead) }
            if let since = query["since"] { filter.since = try Self.parseTime(String(since), "since") }
            if let until = query["until"] { filter.until = try Self.parseTime(String(until), "until") }
            if let text = query["limit"] {
                guard let limit = Int(text), (1...10_000).contains(limit) else {
                    throw ApusError(.badRequest, "limit must be 1-10000 (got \"\(text.prefix(20))\")")
                }
                filter.limit = limit
            }
            let records = try manager.store.list(filter)
            return try Self.json(TaskListing(tasks: records.map(manager.view), count: records.count))
        }

        router.get("/v1/tasks") { request, _ in try list(request, deadOnly: false) }
        router.get("/v1/tasks/dead-letter") { request, _ in try list(request, deadOnly: true) }

        router.get("/v1/tasks/counts") { request, _ in
            struct Counts: Encodable { var function: String?; var states: [String: Int] }
            let function = request.uri.queryParameters["function"].map(String.init)
            return try Self.json(Counts(function: function, states: try manager.store.counts(function: function)))
        }

        router.get("/v1/tasks/:id") { _, context in
            guard let id = context.parameters.get("id") else { throw ApusError(.badRequest, "missing task id") }
            return try Self.json(manager.view(try manager.task(id)))
        }

        router.delete("/v1/tasks/:id") { _, context in
            guard let id = context.parameters.get("id") else { throw ApusError(.badRequest, "missing task id") }
            let record = try await manager.cancel(id)
            return try Self.json(manager.view(record), status: record.state.isTerminal ? .ok : .accepted)
        }

        Self.addProgressRoute(to: router, tasks: manager)
    }

    /// `POST /v1/tasks/{id}/progress`, where instances report progress: on the control API, and alone on the
    /// instance API (`instanceRouter`) that instances in network namespaces of their own reach.
    static func addProgressRoute(to router: Router<ControlRequestContext>, tasks manager: TaskManager) {
        router.post("/v1/tasks/:id/progress") { request, context in
            guard let id = context.parameters.get("id") else { throw ApusError(.badRequest, "missing task id") }
            struct Report: Decodable { var progress: Double?; var message: String? }
            var request = request
            let body = try await request.collectBody(upTo: 64 << 10)
            var report = Report()
            if body.readableBytes > 0 {
                do {
                    report = try JSONDecoder().decode(Report.self, from: Data(buffer: body))
                } catch {
                    throw ApusError(.badRequest, "progress body must be {\"progress\": NUMBER, \"message\": TEXT} (both optional): \(error)")
                }
            }
            return try Self.json(try await manager.progress(id, progress: report.progress, message: report.message))
        }
    }

    /// The instance API: the progress route and nothing else (no function, release or registry route, no bearer
    /// token accepted), served on the address instances in network namespaces reach
    /// (`InstanceNetworks.servicesAddress`). A post needs the task's capability (`?capability=`) when `authority` is
    /// given.
    public static func instanceRouter(tasks: TaskManager, authority: TokenAuthority?) -> Router<ControlRequestContext> {
        let router = Router(context: ControlRequestContext.self)
        if let authority { router.add(middleware: InstanceAPIGate(authority: authority, audit: Logger(label: "apus.audit"))) }
        router.add(middleware: ErrorMiddleware())
        addProgressRoute(to: router, tasks: tasks)
        return router
    }
}

/// The instance API's front door: a progress post is let through only with its task's capability.
struct InstanceAPIGate: RouterMiddleware {
    typealias Context = ControlRequestContext

    let authority: TokenAuthority
    let audit: Logger

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard context.endpointPath == "/v1/tasks/{id}/progress", let id = context.parameters.get("id") else {
            return try await next(request, context)  // 404: nothing else is served here
        }
        let capability = request.uri.queryParameters["capability"].map(String.init)
        let response: Response
        if let capability, authority.isProgressCapability(capability, for: id) {
            response = try await next(request, context)
        } else {
            response = ControlAPI.errorResponse(ApusError(.forbidden, capability == nil
                ? "progress for task \(id) needs the capability of its progress URL (?capability=)"
                : "the capability does not belong to task \(id)"))
        }
        audit.info("api call", metadata: ["token": "capability", "method": "\(request.method.rawValue)",
                                          "path": "\(request.uri.path)", "status": "\(response.status.code)", "listener": "instance-api"])
        return response
    }
}
