import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1

/// Delivers finished tasks' outcomes to callback URLs: a JSON POST of the task (as `GET /v1/tasks/<id>` shows it),
/// retried with exponential backoff until a 2xx answer or the attempts run out.
final class CallbackSender: Sendable {
    private let client: HTTPClient
    private let logger: Logger

    init(logger: Logger) {
        var configuration = HTTPClient.Configuration()
        // A redirect could lead anywhere, the node itself included: not followed (a 3xx is a failed attempt).
        configuration.redirectConfiguration = .disallow
        configuration.timeout = .init(connect: .seconds(5), read: .seconds(30))
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        self.logger = logger
    }

    /// `policy.refusal(for:resolve:)` on a thread of its own (name resolution blocks).
    static func refusal(_ policy: CallbackPolicy, _ url: String) async -> String? {
        await withCheckedContinuation { continuation in
            Thread.detachNewThread { continuation.resume(returning: policy.refusal(for: url, resolve: true)) }
        }
    }

    func shutdown() async {
        try? await client.shutdown()
    }

    /// Returns whether it was delivered, and after how many attempts.
    func deliver(_ body: Data, to url: String, attempts: Int, backoff: Duration, task: String,
                 policy: CallbackPolicy = CallbackPolicy()) async -> (Bool, Int) {
        var delay = backoff
        for attempt in 1...max(1, attempts) {
            // What the host resolves to now (a name may have been pointed at this node since it was accepted).
            if let refusal = await Self.refusal(policy, url) {
                logger.warning("task callback refused", metadata: ["task": "\(task)", "url": "\(url)", "reason": "\(refusal)"])
                return (false, attempt)
            }
            var request = HTTPClientRequest(url: url)
            request.method = .POST
            request.headers.add(name: "Content-Type", value: "application/json")
            request.headers.add(name: "X-Apus-Task-Id", value: task)
            request.headers.add(name: "User-Agent", value: "apus-task-callback")
            request.body = .bytes(ByteBuffer(bytes: body))
            var failure: String
            do {
                let response = try await client.execute(request, timeout: .seconds(30))
                _ = try? await response.body.collect(upTo: 1 << 20)
                if (200..<300).contains(response.status.code) {
                    logger.info("task callback delivered", metadata: ["task": "\(task)", "url": "\(url)", "attempt": "\(attempt)"])
                    return (true, attempt)
                }
                failure = "HTTP \(response.status.code)"
            } catch {
                failure = "\(error)"
            }
            logger.warning("task callback failed", metadata: ["task": "\(task)", "url": "\(url)", "attempt": "\(attempt)", "error": "\(failure)"])
            if attempt < attempts {
                try? await Task.sleep(for: delay)
                delay = delay * 2
            }
        }
        return (false, attempts)
    }
}
