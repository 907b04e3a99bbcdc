import GRPCCore

extension EchoService {
    /// Applies a request's knobs before it is answered: waits `sleep_ms` (a call cancelled meanwhile, by the client,
    /// its deadline or a forced shutdown, stops waiting, logs `cancelled <method> <text>` and ends), then ends the
    /// call with `fail_code` and `fail_message` when `fail_code` is set. `trailers` go with the error.
    func applyKnobs(
        of request: Echo_EchoRequest,
        method: String,
        context: ServerContext,
        trailers: Metadata
    ) async throws {
        if request.sleepMs > 0 {
            let slept = await self.sleep(milliseconds: request.sleepMs, context: context)
            if !slept {
                Console.out("cancelled \(method) \(request.text)")
                throw RPCError(code: .cancelled, message: "\(method) was cancelled while sleeping", metadata: trailers)
            }
        }
        if request.failCode != 0 {
            throw Self.requestedError(code: request.failCode, message: request.failMessage, trailers: trailers)
        }
    }

    /// Ends the call when it was cancelled (see `isCancelled(_:)`).
    func checkCancellation(_ context: ServerContext) throws {
        if self.isCancelled(context) {
            throw RPCError(code: .cancelled, message: "\(context.descriptor.method) was cancelled")
        }
    }

    /// Whether the call was cancelled: by the client (RST_STREAM) or its deadline, which gRPC signals through the
    /// call's cancellation handle, or by a forced shutdown, which cancels the handler's task. While the server
    /// drains, the handle fires for every call; that alone does not count.
    func isCancelled(_ context: ServerContext) -> Bool {
        Task.isCancelled || (context.cancellation.isCancelled && !self.draining.isDraining)
    }

    /// Sleeps, or less when the call is cancelled first (see `isCancelled(_:)`); false in that case.
    func sleep(milliseconds: UInt32, context: ServerContext) async -> Bool {
        let end = ContinuousClock.now + .milliseconds(Int(milliseconds))
        let cancellation = context.cancellation
        let draining = self.draining
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                try? await Task.sleep(until: end)
            }
            group.addTask {
                try? await cancellation.cancelled
                if draining.isDraining {
                    // The drain's hint to wrap up: keep sleeping until the end or until the task is cancelled.
                    try? await Task.sleep(until: end)
                }
            }
            await group.next()
            group.cancelAll()
        }
        return !self.isCancelled(context)
    }

    /// The error a request asked for. A code outside gRPC's (1...16) becomes UNKNOWN, saying which code was asked.
    static func requestedError(code: Int32, message: String, trailers: Metadata) -> RPCError {
        if let status = Status.Code(rawValue: Int(code)), let rpcCode = RPCError.Code(status) {
            return RPCError(code: rpcCode, message: message, metadata: trailers)
        }
        return RPCError(
            code: .unknown,
            message: "fail_code \(code) is not a gRPC status code: \(message)",
            metadata: trailers
        )
    }
}
