import ApusCore
import ApusScheduler
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// One HTTP request that arrived on an HTTP/2 stream (or over TLS) for an HTTP function, relayed to an instance
/// over HTTP/1.1 — instances of `protocol: http` functions speak only that. The stream's frames are turned into
/// HTTP/1 parts by NIO's HTTP2-to-HTTP1 codec in front of this handler. Bodies stream in both directions with
/// backpressure; errors are the same JSON documents the HTTP/1.1 edge sends.
final class HTTPOverHTTP2Stream: ChannelInboundHandler, LoopSlotTarget {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    enum Phase {
        case idle
        /// An asynchronous submission: reading its body (`HTTPOverHTTP2Stream+Async.swift`).
        case collectingAsync
        /// Waiting for the task store to take it.
        case submittingAsync
        /// Head received; body parts wait here until an instance connection is there.
        case waitingForSlot
        case connecting
        case relaying
        case finished
    }

    let shared: GatewayShared
    private let peer: String
    private let scheme: String
    var context: ChannelHandlerContext!
    var phase = Phase.idle
    var requestID = ""
    var version: FunctionVersion?
    private var slot = CallSlot()
    private var retried = false
    private(set) var deadline = ContinuousClock.now
    /// Where the loop's `CallDeadlines` keeps this request (-1: not kept).
    var deadlineSlot = -1
    private var budget = Duration.zero
    private var upstreamHead: HTTPRequestHead?
    private var pending: [HTTPClientRequestPart] = []
    var requestEnded = false
    var responseStarted = false
    /// The response's end is being written: the stream closing now is the normal end.
    private var responseEnding = false
    private var upstream: InstanceHTTP1Connection?
    private var slotWaiter: LoopSlotWaiter?
    /// An asynchronous submission while its body is read, and the payload limit.
    var asyncSubmission: TaskSubmission?
    var asyncLimit = 0
    private var arrivedAt = ContinuousClock.now
    /// The status the client got (metrics); 0 while none was sent.
    private var status = 0
    /// False when the function's `auth:` checked the request's credential: the instance does not get it.
    private var keepCredential = true
    /// Request body bytes this stream holds (waiting for an instance, or an asynchronous body), counted in the
    /// gateway's `httpBodies` budget.
    var heldBody = HeldBodyBytes()
    /// Body bytes in `pending`.
    private var pendingBodyBytes = 0
    /// Reading stopped while waiting for an instance, `pending` being full.
    private var pausedWhileWaiting = false
    /// Body bytes read into `pending` while the call waits before reading stops.
    static let pendingBeforePause = 64 << 10

    /// Counts `count` more body bytes held; false (and the stream answered 429) when the gateway holds its limit.
    func holdBody(_ count: Int) -> Bool {
        guard heldBody.add(count, in: shared) else {
            respond(GatewayShared.bodyBufferFull(shared.configuration.httpMaxBufferedBytes))
            return false
        }
        return true
    }

    func releaseHeldBody() {
        heldBody.release(in: shared)
    }

    init(shared: GatewayShared, peer: String, scheme: String) {
        self.shared = shared
        self.peer = peer
        self.scheme = scheme
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        slotWaiter = nil
        if phase != .finished { finish(upstreamReusable: false) }
        // The context holds this handler for good: keeping it here would keep both alive after the stream (a
        // leak per request). What may still call in after this point checks the phase first.
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            guard phase == .idle else { return }
            start(head)
        case .body(let bytes):
            forward(.body(.byteBuffer(bytes)))
        case .end(let trailers):
            requestEnded = true
            forward(.end(trailers))
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        upstream?.channel.flush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        upstream?.channel.setReading(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if phase != .finished {
            finish(upstreamReusable: responseEnding && requestEnded)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if phase != .finished { fail(ApusError(.badRequest, "malformed HTTP/2 request: \(error)")) }
        context.close(promise: nil)
    }

    private func forward(_ part: HTTPClientRequestPart) {
        switch phase {
        case .relaying:
            upstream?.channel.write(part, promise: nil)
        case .waitingForSlot, .connecting:
            if case .body(.byteBuffer(let bytes)) = part {
                guard holdBody(bytes.readableBytes) else { return }
                pendingBodyBytes += bytes.readableBytes
                if pendingBodyBytes >= Self.pendingBeforePause, !pausedWhileWaiting {
                    pausedWhileWaiting = true
                    guard holdBody(shared.configuration.http2.initialWindowSize) else { return }
                    context.channel.setReading(false)
                }
            }
            pending.append(part)
        case .collectingAsync:
            collectAsync(part)
        case .idle, .finished, .submittingAsync:
            break
        }
    }

    // MARK: routing

    private func start(_ head: HTTPRequestHead) {
        arrivedAt = .now
        requestID = shared.requestIDs.next()
        if head.uri.hasPrefix("/async/") || head.headers.first(name: "x-apus-invocation")?.lowercased() == "async" {
            startAsync(head)
            return
        }
        let host = head.headers.first(name: "host")
        let route: GatewayRoute
        let dispatch: Dispatcher.Dispatch
        do throws(ApusError) {
            route = try GatewayRoute.resolve(host: host, uri: head.uri, domain: shared.configuration.domain, catalog: shared.scheduler.catalog)
            keepCredential = try shared.authorizeInvocation(function: route.function, credential: try Self.credential(head.headers))
            var invocation = Invocation(
                requestID: requestID, function: route.function,
                pinnedVersion: try VersionPin.parse(head.headers.first(name: "x-apus-version"), name: "X-Apus-Version"),
                method: head.method.rawValue, path: route.instancePath)
            dispatch = try shared.dispatcher.dispatch(&invocation, roll: shared.roll(on: context.eventLoop))
        } catch {
            respond(error)
            return
        }
        let version = dispatch.version
        self.version = version
        budget = dispatch.budget
        deadline = dispatch.deadline
        shared.callDeadlines(for: context.eventLoop).add(self)
        upstreamHead = makeUpstreamHead(head, route: route, version: version)
        // The body is read into `pending` (counted) while the call waits, up to `pendingBeforePause`; past it
        // reading stops and what NIO may still take for the stream (its window) is counted as held.
        slot.pool = dispatch.pool
        acquireSlot()
    }

    /// The request's `Authorization`; more than one is refused.
    static func credential(_ headers: HTTPHeaders) throws(ApusError) -> String? {
        let values = headers["authorization"]
        guard values.count <= 1 else { throw ApusError(.badRequest, "more than one Authorization header") }
        return values.first
    }

    private static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "http2-settings",
    ]

    private func makeUpstreamHead(_ head: HTTPRequestHead, route: GatewayRoute, version: FunctionVersion) -> HTTPRequestHead {
        var headers = HTTPHeaders()
        var forwardedFor: String?
        for (name, value) in head.headers {
            let lower = name.lowercased()
            if Self.hopByHop.contains(lower) || lower.hasPrefix("x-apus-") { continue }
            if !keepCredential, lower == "authorization" { continue }
            if lower == "x-forwarded-for" {
                forwardedFor = value
                continue
            }
            headers.add(name: name, value: value)
        }
        headers.add(name: "X-Forwarded-For", value: forwardedFor.map { "\($0), \(peer)" } ?? peer)
        if let host = head.headers.first(name: "host") { headers.add(name: "X-Forwarded-Host", value: host) }
        headers.add(name: "X-Forwarded-Proto", value: scheme)
        if let prefix = route.forwardedPrefix { headers.add(name: "X-Forwarded-Prefix", value: prefix) }
        headers.add(name: "X-Apus-Request-Id", value: requestID)
        headers.add(name: "X-Apus-Function", value: version.function)
        headers.add(name: "X-Apus-Version", value: String(version.number))
        headers.add(name: "X-Apus-Deadline-Ms", value: String(Int64(Date().timeIntervalSince1970 * 1000) + version.manifest.timeout.milliseconds))
        return HTTPRequestHead(version: .http1_1, method: head.method, uri: route.instancePath, headers: headers)
    }

    private func acquireSlot() {
        if slotWaiter == nil { slotWaiter = LoopSlotWaiter(NIOLoopBound<any LoopSlotTarget>(self, eventLoop: context.eventLoop)) }
        proceed(slot.acquire(requestID: requestID, deadline: deadline, waiter: slotWaiter!, shard: shared.shardKey(for: context.eventLoop)))
    }

    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
        proceed(slot.decided(result, stillWaiting: phase == .waitingForSlot && requestID == self.requestID))
    }

    private func proceed(_ outcome: CallSlot.Outcome?) {
        switch outcome {
        case .leased: connect()
        case .failed(let error): fail(error)
        case .waiting: phase = .waitingForSlot
        case nil: break
        }
    }

    // MARK: instance side

    private func connect() {
        guard let lease = slot.lease else { return }
        phase = .connecting
        let requestID = self.requestID
        shared.instanceHTTP1Pool(for: context.eventLoop).connection(instanceID: lease.instanceID, endpoint: lease.endpoint) { [self] result in
            guard phase == .connecting, requestID == self.requestID else {
                if case .success(let connection) = result { connection.channel.close(promise: nil) }
                return
            }
            switch result {
            case .success(let connection):
                relay(on: connection)
            case .failure(let error):
                slot.reportUnreachable()
                if retried {
                    fail(ApusError(.instanceError, "cannot connect to instance \(lease.instanceID): \(error)"))
                } else {
                    retried = true
                    acquireSlot()
                }
            }
        }
    }

    private func relay(on connection: InstanceHTTP1Connection) {
        guard var head = upstreamHead else { return }
        upstream = connection
        connection.exchange = self
        phase = .relaying
        // Without a Content-Length the body goes chunked, unless the request already ended without one.
        if head.headers["content-length"].isEmpty {
            if requestEnded, pending.count == 1, case .end = pending[0] {
                if [.POST, .PUT, .PATCH].contains(head.method) { head.headers.add(name: "Content-Length", value: "0") }
            } else {
                head.headers.add(name: "Transfer-Encoding", value: "chunked")
            }
        }
        connection.channel.write(HTTPClientRequestPart.head(head), promise: nil)
        for part in pending { connection.channel.write(part, promise: nil) }
        pending = []
        pendingBodyBytes = 0
        releaseHeldBody()
        connection.channel.flush()
        connection.channel.setReading(context.channel.isWritable)
        context.channel.setReading(connection.channel.isWritable)
    }

    fileprivate func upstreamPart(_ part: HTTPClientResponsePart) {
        guard phase == .relaying, let version else { return }
        switch part {
        case .head(var head):
            responseStarted = true
            status = Int(head.status.code)
            for name in Self.hopByHop { head.headers.remove(name: name) }
            head.headers.add(name: "x-apus-version", value: String(version.number))
            head.headers.add(name: "x-apus-request-id", value: requestID)
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: head.status, headers: head.headers))), promise: nil)
        case .body(let bytes):
            context.write(wrapOutboundOut(.body(.byteBuffer(bytes))), promise: nil)
        case .end(let trailers):
            responseEnding = true
            context.writeAndFlush(wrapOutboundOut(.end(trailers)), promise: nil)
            finish(upstreamReusable: requestEnded)
        }
    }

    fileprivate func upstreamFlush() {
        context?.flush()
    }

    fileprivate func upstreamWritabilityChanged(_ writable: Bool) {
        if phase == .relaying { context.channel.setReading(writable) }
    }

    fileprivate func upstreamClosed() {
        guard phase == .relaying else { return }
        upstream = nil
        let reason = responseStarted ? "instance closed the connection mid-response" : "instance closed the connection before answering"
        shared.settleInstanceFailure(reason, instanceID: slot.lease?.instanceID, on: context.eventLoop) { [self] error, _ in
            guard phase == .relaying, upstream == nil else { return }  // ended meanwhile (deadline, reset)
            fail(error)
        }
    }

    // MARK: endings

    private func fail(_ error: ApusError) {
        guard phase != .finished else { return }
        shared.logger.info("request failed", metadata: [
            "requestID": "\(requestID)", "function": "\(version?.function ?? "-")",
            "version": "\(version.map { String($0.number) } ?? "-")", "code": "\(error.code)", "reason": "\(error.message)",
            "protocol": "h2",
        ])
        if responseStarted {
            finish(upstreamReusable: false)
            context.close(promise: nil)
        } else {
            respond(error)
        }
    }

    func respond(_ error: ApusError) {
        let body = error.jsonBody + "\n"
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "application/json")
        headers.add(name: "content-length", value: String(body.utf8.count))
        if !requestID.isEmpty { headers.add(name: "x-apus-request-id", value: requestID) }
        if let version { headers.add(name: "x-apus-version", value: String(version.number)) }
        if error.code == .overloaded || error.code == .unavailable { headers.add(name: "retry-after", value: "1") }
        if error.code == .unauthenticated { headers.add(name: "www-authenticate", value: ApusError.bearerChallenge) }
        responseStarted = true
        status = error.code.httpStatus
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .init(statusCode: error.code.httpStatus), headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        finish(upstreamReusable: false)
    }

    func finish(upstreamReusable: Bool) {
        guard phase != .finished else { return }
        phase = .finished
        // Ended before its end was sent (client reset, instance failure mid-response): the client's own code, or 499.
        let code = responseEnding && status != 0 ? GatewayConnectionHandler.statusCode(status) : GatewayConnectionHandler.clientClosedCode
        slot.pool?.metrics.recordRequest(protocol: "http", code: code, since: arrivedAt)
        if deadlineSlot >= 0 { shared.callDeadlines(for: context.eventLoop).remove(self) }
        pending = []
        releaseHeldBody()
        slot.giveBack(requestID: requestID)
        if let upstream {
            upstream.exchange = nil
            self.upstream = nil
            if upstreamReusable, upstream.keepAlive {
                shared.instanceHTTP1Pool(for: context.eventLoop).release(upstream)
            } else {
                upstream.channel.close(promise: nil)
            }
        }
    }
}

/// Kept-alive HTTP/1.1 connections (NIO's codec) to HTTP instances, for requests that arrived over HTTP/2.
/// Lives on its event loop.
final class InstanceHTTP1Pool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private let idle = IdleConnections<InstanceHTTP1Connection>(maxPerInstance: 64)

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func connection(instanceID: String, endpoint: InstanceEndpoint, _ completion: @escaping (Result<InstanceHTTP1Connection, any Error>) -> Void) {
        eventLoop.assertInEventLoop()
        if let connection = idle.take(instanceID: instanceID, endpoint: endpoint) {
            completion(.success(connection))
            return
        }
        let handler = InstanceHTTP1Handler()
        let bound = NIOLoopBound(handler, eventLoop: eventLoop)
        connectToInstance(endpoint: endpoint, on: eventLoop) { channel in
            try channel.pipeline.syncOperations.addHTTPClientHandlers()
            try channel.pipeline.syncOperations.addHandler(bound.value)
        }
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    let connection = InstanceHTTP1Connection(channel: channel, instanceID: instanceID, endpoint: endpoint)
                    bound.value.connection = connection
                    completion(.success(connection))
                case .failure(let error):
                    completion(.failure(error))
                }
            }
    }

    func release(_ connection: InstanceHTTP1Connection) {
        idle.put(connection)
    }

    func closeAll() {
        idle.closeAll()
    }
}

final class InstanceHTTP1Connection: PooledInstanceConnection {
    let channel: any Channel
    let instanceID: String
    let endpoint: InstanceEndpoint
    var watchedWhileIdle = false
    /// False once the instance asked to close (Connection: close, HTTP/1.0).
    fileprivate(set) var keepAlive = true
    fileprivate weak var exchange: HTTPOverHTTP2Stream?

    init(channel: any Channel, instanceID: String, endpoint: InstanceEndpoint) {
        self.channel = channel
        self.instanceID = instanceID
        self.endpoint = endpoint
    }
}

private final class InstanceHTTP1Handler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    var connection: InstanceHTTP1Connection?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        if case .head(let head) = part, !head.isKeepAlive { connection?.keepAlive = false }
        connection?.exchange?.upstreamPart(part)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        connection?.exchange?.upstreamFlush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        connection?.exchange?.upstreamWritabilityChanged(context.channel.isWritable)
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection?.keepAlive = false
        connection?.exchange?.upstreamClosed()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

extension HTTPOverHTTP2Stream: DeadlineTarget {
    func deadlinePassed() {
        guard phase != .finished else { return }
        fail(ApusError(.deadlineExceeded, "function did not answer within its timeout of \(budget.humanReadable)"))
    }
}
