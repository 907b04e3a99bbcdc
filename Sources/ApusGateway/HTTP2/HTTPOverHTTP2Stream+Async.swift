import ApusCore
import NIOCore
import NIOHTTP1

/// Asynchronous submissions over HTTP/2 (h2c or TLS), as on the HTTP/1.1 edge (`GatewayConnectionHandler+Async`):
/// `X-Apus-Invocation: async` or `/async/<function>/…`, the body read whole, `202` with `{"id","status_url","created"}`
/// and `Location` once the task is durable (`200` for a matching `Idempotency-Key`).
extension HTTPOverHTTP2Stream {
    func startAsync(_ head: HTTPRequestHead) {
        guard let submitter = shared.configuration.tasks else {
            respond(ApusError(.badRequest, "asynchronous invocation is not enabled on this gateway"))
            return
        }
        var uri = head.uri
        var host = head.headers.first(name: "host")
        if uri.hasPrefix("/async/") {
            uri = String(uri.dropFirst("/async".count))
            host = nil
        }
        do throws(ApusError) {
            let route = try GatewayRoute.resolve(host: host, uri: uri, domain: shared.configuration.domain)
            _ = try shared.authorizeInvocation(function: route.function, credential: try Self.credential(head.headers))
            let pinned = try VersionPin.parse(head.headers.first(name: "x-apus-version"), name: "X-Apus-Version")
            let version = try shared.dispatcher.version(
                for: Invocation(requestID: requestID, function: route.function, pinnedVersion: pinned, method: head.method.rawValue, path: route.instancePath),
                roll: shared.roll(on: context.eventLoop))
            self.version = version
            var submission = TaskSubmission(function: route.function, pinnedVersion: pinned, kind: .http, method: head.method.rawValue,
                                            path: route.instancePath, contentType: head.headers.first(name: "content-type"),
                                            payload: [], requestID: requestID)
            if let key = head.headers.first(name: "idempotency-key") {
                try TaskSubmission.validateIdempotencyKey(key)
                submission.idempotencyKey = key
            }
            if let priority = head.headers.first(name: "x-apus-priority") { submission.priority = try TaskSubmission.parsePriority(priority) }
            if let callback = head.headers.first(name: "x-apus-callback-url") {
                guard FunctionManifest.isCallbackURL(callback) else {
                    throw ApusError(.badRequest, "X-Apus-Callback-Url must be an absolute http:// or https:// URL (got \"\(callback.prefix(200))\")")
                }
                submission.callbackURL = callback
            }
            if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }), length > submitter.maxPayloadBytes {
                throw ApusError(.tooLarge, "task payload of \(length) bytes exceeds the limit of \(submitter.maxPayloadBytes) bytes")
            }
            asyncSubmission = submission
            asyncLimit = submitter.maxPayloadBytes
        } catch {
            respond(error)
            return
        }
        phase = .collectingAsync
    }

    func collectAsync(_ part: HTTPClientRequestPart) {
        guard var submission = asyncSubmission else { return }
        switch part {
        case .body(.byteBuffer(let buffer)):
            guard submission.payload.count + buffer.readableBytes <= asyncLimit else {
                asyncSubmission = nil
                respond(ApusError(.tooLarge, "task payload exceeds the limit of \(asyncLimit) bytes"))
                return
            }
            guard holdBody(buffer.readableBytes) else {
                asyncSubmission = nil
                return
            }
            submission.payload += buffer.readableBytesView
            asyncSubmission = submission
        case .end:
            submitAsync(submission)
        default:
            break
        }
    }

    private func submitAsync(_ submission: TaskSubmission) {
        guard let submitter = shared.configuration.tasks else { return }
        phase = .submittingAsync
        let stream = NIOLoopBound(self, eventLoop: context.eventLoop)
        Task {
            let result: Result<TaskReceipt, ApusError>
            do throws(ApusError) {
                result = .success(try await submitter.submit(submission))
            } catch {
                result = .failure(error)
            }
            stream.eventLoop.execute { stream.value.asyncSubmitted(result) }
        }
    }

    private func asyncSubmitted(_ result: Result<TaskReceipt, ApusError>) {
        guard phase == .submittingAsync else { return }
        asyncSubmission = nil
        switch result {
        case .failure(let error):
            respond(error)
        case .success(let receipt):
            let body = receipt.jsonBody + "\n"
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "content-length", value: String(body.utf8.count))
            headers.add(name: "location", value: receipt.statusURL)
            headers.add(name: "x-apus-task-id", value: receipt.id)
            headers.add(name: "x-apus-request-id", value: requestID)
            if let version { headers.add(name: "x-apus-version", value: String(version.number)) }
            responseStarted = true
            let status: HTTPResponseStatus = receipt.created ? .accepted : .ok
            context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http2, status: status, headers: headers))), promise: nil)
            context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)), promise: nil)
            finish(upstreamReusable: false)
        }
    }
}
