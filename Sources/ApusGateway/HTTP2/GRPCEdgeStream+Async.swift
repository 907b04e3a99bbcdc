import ApusCore
import ApusWire
import NIOCore
import NIOHPACK
import NIOHTTP2

/// Asynchronous gRPC calls: metadata `apus-invocation: async` turns a unary call into a task. The request
/// message(s) are read whole (up to the task payload limit) and handed to the `AsyncTaskSubmitter`; once the task is
/// durable the caller gets a normal OK response whose message is empty (zero bytes: the default value of any
/// protobuf message type) and whose initial metadata carries `apus-task-id` and `apus-task-status-url`
/// (`apus-task-created: false` when an `apus-idempotency-key` matched an earlier task). The instance later gets the
/// same method and request message, with metadata `apus-task-id` and `apus-attempt`. `apus-callback-url` and
/// `apus-priority` go with the task.
extension GRPCEdgeStream {
    func startAsync(_ headers: HPACKHeaders) {
        guard let submitter = shared.configuration.tasks, let version else {
            respondAndFinish(status: GRPCWire.statusUnimplemented, message: "asynchronous invocation is not enabled on this gateway")
            return
        }
        var submission = TaskSubmission(function: version.function, pinnedVersion: headers.first(name: "apus-version").flatMap { Int($0) },
                                        kind: .grpc, method: rpcPath, path: rpcPath, contentType: headers.first(name: "content-type"),
                                        payload: [], requestID: requestID)
        do throws(ApusError) {
            if let key = headers.first(name: "apus-idempotency-key") {
                try TaskSubmission.validateIdempotencyKey(key)
                submission.idempotencyKey = key
            }
            if let priority = headers.first(name: "apus-priority") { submission.priority = try TaskSubmission.parsePriority(priority) }
            if let callback = headers.first(name: "apus-callback-url") {
                guard FunctionManifest.isCallbackURL(callback) else {
                    throw ApusError(.badRequest, "apus-callback-url must be an absolute http:// or https:// URL (got \"\(callback.prefix(200))\")")
                }
                submission.callbackURL = callback
            }
        } catch {
            respondAndFinish(status: GRPCWire.status(for: error), message: error.message)
            return
        }
        asyncSubmission = submission
        asyncLimit = submitter.maxPayloadBytes
        phase = .collectingAsync
        if requestEnded { submitAsync() }
    }

    func collectAsync(_ payload: HTTP2Frame.FramePayload) {
        guard case .data(let data) = payload, var submission = asyncSubmission else { return }
        if case .byteBuffer(let buffer) = data.data {
            guard submission.payload.count + buffer.readableBytes <= asyncLimit + 5 else {
                asyncSubmission = nil
                respondAndFinish(status: GRPCWire.statusResourceExhausted,
                                 message: "task payload exceeds the limit of \(asyncLimit) bytes")
                return
            }
            guard holdBody(buffer.readableBytes) else {
                asyncSubmission = nil
                return
            }
            submission.payload += buffer.readableBytesView
        }
        asyncSubmission = submission
        if data.endStream { submitAsync() }
    }

    private func submitAsync() {
        guard let submission = asyncSubmission, let submitter = shared.configuration.tasks else { return }
        phase = .submittingAsync
        let stream = NIOLoopBound(self, eventLoop: eventLoop)
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
            respondAndFinish(status: GRPCWire.status(for: error), message: error.message)
        case .success(let receipt):
            var headers = HPACKHeaders()
            headers.add(name: ":status", value: "200")
            headers.add(name: "content-type", value: "application/grpc")
            headers.add(name: "apus-task-id", value: receipt.id)
            headers.add(name: "apus-task-status-url", value: receipt.statusURL)
            headers.add(name: "apus-task-created", value: receipt.created ? "true" : "false")
            headers.add(name: "apus-request-id", value: requestID, indexing: .nonIndexable)
            responseStarted = true
            edge.write(.headers(.init(headers: headers)), on: streamID)
            var empty = edge.allocator.buffer(capacity: 5)
            empty.writeInteger(UInt8(0))
            empty.writeInteger(UInt32(0))
            edge.write(.data(.init(data: .byteBuffer(empty))), on: streamID)
            respondAndFinish(status: GRPCWire.statusOK, message: "")
        }
    }
}
