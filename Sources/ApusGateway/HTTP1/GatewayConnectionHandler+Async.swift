import ApusCore
import ApusWire
import NIOCore

/// Asynchronous submissions on the HTTP/1.1 edge: `X-Apus-Invocation: async` on any request, or a path under
/// `/async/<function>/…`. The body is read whole (up to the task payload limit), handed to the `AsyncTaskSubmitter`,
/// and the client gets `202 Accepted` with `{"id","status_url","created"}` and `Location: <status URL>` once the task
/// is durable (`200` with the earlier task's id when an `Idempotency-Key` matched). `X-Apus-Callback-Url` and
/// `X-Apus-Priority` go with the task; the instance later gets the request's method, path (prefix stripped) and
/// body, with `X-Apus-Task-Id` and `X-Apus-Attempt`.
extension GatewayConnectionHandler {
    static let asyncPrefix = "/async/"

    struct PendingAsync {
        var submission: TaskSubmission
        var framing: BodyFraming
        var raw: [UInt8]
        var closeAfter: Bool
        var version: Int?
    }

    func startAsync(_ head: RequestHead, rawHead: ByteBuffer) {
        let requestID = shared.requestIDs.next()
        let hasBody: Bool
        if case .none = head.framing { hasBody = false } else { hasBody = true }
        let closeAfter = hasBody || !head.keepAlive || draining
        func refuse(_ error: ApusError, version: Int? = nil) {
            shared.logger.info("async submission refused", metadata: ["requestID": "\(requestID)", "code": "\(error.code)", "reason": "\(error.message)"])
            respondWithError(error, requestID: requestID, version: version, close: closeAfter)
        }
        guard let submitter = shared.configuration.tasks else {
            return refuse(ApusError(.badRequest, "asynchronous invocation is not enabled on this gateway"))
        }
        var target = head.target
        if target.hasPrefix(Self.asyncPrefix) { target = String(target.dropFirst(Self.asyncPrefix.count - 1)) }
        let version: FunctionVersion
        var submission: TaskSubmission
        do throws(ApusError) {
            let route = try GatewayRoute.resolve(host: target == head.target ? head.host : nil, uri: target, domain: shared.configuration.domain)
            _ = try shared.authorizeInvocation(function: route.function, credential: head.authorization)
            let pinned = try head.pinnedVersionNumber()
            version = try shared.dispatcher.version(
                for: Invocation(requestID: requestID, function: route.function, pinnedVersion: pinned, method: head.method, path: route.instancePath),
                roll: nextRoll())
            submission = TaskSubmission(function: route.function, pinnedVersion: pinned, kind: .http, method: head.method,
                                        path: route.instancePath, payload: [], requestID: requestID)
            rawHead.withUnsafeReadableBytes { bytes in
                if let range = head.contentTypeValue { submission.contentType = HTTPBytes.string(bytes, range) }
                if let range = head.idempotencyKeyValue { submission.idempotencyKey = HTTPBytes.string(bytes, range) }
            }
            if let key = submission.idempotencyKey { try TaskSubmission.validateIdempotencyKey(key) }
            if let priority = head.priority { submission.priority = try TaskSubmission.parsePriority(priority) }
            if let callback = head.callbackURL {
                guard FunctionManifest.isCallbackURL(callback) else {
                    throw ApusError(.badRequest, "X-Apus-Callback-Url must be an absolute http:// or https:// URL (got \"\(callback.prefix(200))\")")
                }
                submission.callbackURL = callback
            }
            if case .length(let length) = head.framing, length > submitter.maxPayloadBytes {
                throw ApusError(.tooLarge, "task payload of \(length) bytes exceeds the limit of \(submitter.maxPayloadBytes) bytes")
            }
        } catch {
            return refuse(error)
        }
        var framing = head.framing
        if case .chunked = framing { framing = .chunked(ChunkedBodyScanner(maxPayload: submitter.maxPayloadBytes)) }
        pendingAsync = PendingAsync(submission: submission, framing: framing, raw: [], closeAfter: !head.keepAlive || draining,
                                    version: version.number)
        if head.expectContinue {
            var interim = context.channel.allocator.buffer(capacity: 25)
            interim.writeStaticString("HTTP/1.1 100 Continue\r\n\r\n")
            context.writeAndFlush(NIOAny(interim), promise: nil)
        }
        phase = .collectingAsync
        collectAsyncBody()
    }

    /// Takes the submission's body bytes from what has arrived; submits once it is complete.
    func collectAsyncBody() {
        guard phase == .collectingAsync, var pending = pendingAsync else { return }
        var done = false
        switch pending.framing {
        case .none, .untilClose:
            done = true
        case .length(let remaining):
            if var buffer = inbound {
                let take = min(remaining, buffer.readableBytes)
                pending.raw += buffer.readBytes(length: take) ?? []
                inbound = buffer.readableBytes == 0 ? nil : buffer
                pending.framing = .length(remaining: remaining - take)
                done = remaining == take
            }
        case .chunked(var scanner):
            if var buffer = inbound {
                let consumed: Int
                do {
                    consumed = try buffer.withUnsafeReadableBytes { bytes throws(ChunkedBodyScanner.ScanError) in try scanner.scan(bytes) }
                } catch {
                    pendingAsync = nil
                    let tooLarge = error == .tooLarge
                    respondWithError(tooLarge ? ApusError(.tooLarge, "task payload exceeds the limit of \(shared.configuration.tasks?.maxPayloadBytes ?? 0) bytes")
                                              : ApusError(.badRequest, "malformed chunked request body"),
                                     requestID: pending.submission.requestID, version: nil, close: true)
                    return
                }
                pending.raw += buffer.readBytes(length: consumed) ?? []
                inbound = buffer.readableBytes == 0 ? nil : buffer
                pending.framing = .chunked(scanner)
                done = scanner.isDone
                if done { pending.raw = Self.dechunk(pending.raw) }
            }
        }
        if !done {
            pendingAsync = pending
            return
        }
        pending.submission.payload = pending.raw
        pending.raw = []
        pendingAsync = pending
        phase = .submittingAsync
        guard let submitter = shared.configuration.tasks else { return }
        let submission = pending.submission
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        Task {
            let result: Result<TaskReceipt, ApusError>
            do throws(ApusError) {
                result = .success(try await submitter.submit(submission))
            } catch {
                result = .failure(error)
            }
            handler.eventLoop.execute { handler.value.asyncSubmitted(result) }
        }
    }

    /// The submission is durable (or was refused): answer the client and go on with the connection.
    func asyncSubmitted(_ result: Result<TaskReceipt, ApusError>) {
        guard phase == .submittingAsync, let pending = pendingAsync else { return }
        pendingAsync = nil
        countHeldBodyBytes()
        let requestID = pending.submission.requestID ?? "-"
        switch result {
        case .failure(let error):
            respondWithError(error, requestID: requestID, version: pending.version, close: pending.closeAfter || draining)
        case .success(let receipt):
            let body = receipt.jsonBody + "\n"
            let close = pending.closeAfter || draining
            var out = context.channel.allocator.buffer(capacity: body.utf8.count + 300)
            out.writeString(receipt.created ? "HTTP/1.1 202 Accepted\r\n" : "HTTP/1.1 200 OK\r\n")
            out.writeString("Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n")
            out.writeString("Location: \(receipt.statusURL)\r\nX-Apus-Task-Id: \(receipt.id)\r\nX-Apus-Request-Id: \(requestID)\r\n")
            if let version = pending.version { out.writeString("X-Apus-Version: \(version)\r\n") }
            if close { out.writeString("Connection: close\r\n") }
            out.writeString("\r\n")
            out.writeString(body)
            context.writeAndFlush(NIOAny(out), promise: nil)
            if close {
                self.close()
                return
            }
            phase = .readingHead
        }
        if phase == .readingHead { process() }
    }

    /// The payload of a complete chunked body (already checked by `ChunkedBodyScanner`).
    static func dechunk(_ raw: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(raw.count)
        var i = 0
        while i < raw.count {
            var size = 0
            while i < raw.count, let digit = hexValue(raw[i]) {
                size = size * 16 + digit
                i += 1
            }
            while i < raw.count, raw[i] != UInt8(ascii: "\n") { i += 1 }  // extensions, CR
            i += 1
            if size == 0 { break }
            let end = min(raw.count, i + size)
            out += raw[i..<end]
            i = end + 2  // CRLF after the data
        }
        return out
    }

    private static func hexValue(_ byte: UInt8) -> Int? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): Int(byte - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): Int(byte - UInt8(ascii: "a")) + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): Int(byte - UInt8(ascii: "A")) + 10
        default: nil
        }
    }
}
