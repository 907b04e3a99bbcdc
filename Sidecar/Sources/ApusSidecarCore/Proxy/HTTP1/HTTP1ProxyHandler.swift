import ApusWire
import ApusMesh
import Logging
import NIOCore

/// One HTTP/1.1 connection into the sidecar, either side. Outbound: the Host header names the upstream; the
/// sidecar picks an endpoint, sends the request with deadline and trace headers, retries within the policy and
/// budget, and feeds the breaker and outlier ejection. Inbound: requests pass the concurrency and per-caller rate
/// limits and go to the app. Header bytes are copied, bodies relayed as they arrive; requests on one connection
/// are served in order. Lives on its event loop.
final class HTTP1ProxyHandler: ChannelInboundHandler, RemovableChannelHandler, HTTP1ResponseSink, DrainableConnection, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        case readingHead
        case resolving
        case connecting
        case forwarding
        case closed
    }

    /// One request in flight on this connection.
    private final class Exchange {
        let head: ProxyRequestHead
        let cluster: UpstreamCluster
        let policy: UpstreamPolicy
        let upstreamHead: ByteBuffer
        let hashKey: String?
        let requestID: String
        let startedAt: Nanos
        let deadline: Nanos
        let retryable: Bool
        var bodyFraming: BodyFraming
        var bodyDone: Bool
        /// Body bytes sent so far, kept while they fit so a retry can send them again.
        var bodyCopy: [ByteBuffer] = []
        var bodyCopyBytes = 0
        var bodyReplayable = true
        var attempts = 0
        var tried: [String] = []
        var endpoint: ServiceEndpoint?
        var connection: HTTP1UpstreamConnection?
        var responseStarted = false
        var status = 0
        var closeAfter: Bool
        var admittedInbound = false
        var staleRetried = false

        init(head: ProxyRequestHead, cluster: UpstreamCluster, policy: UpstreamPolicy, upstreamHead: ByteBuffer, hashKey: String?,
             requestID: String, startedAt: Nanos, deadline: Nanos, retryable: Bool, closeAfter: Bool) {
            self.head = head
            self.cluster = cluster
            self.policy = policy
            self.upstreamHead = upstreamHead
            self.hashKey = hashKey
            self.requestID = requestID
            self.startedAt = startedAt
            self.deadline = deadline
            self.retryable = retryable
            self.bodyFraming = head.framing
            self.bodyDone = !head.hasBody
            self.closeAfter = closeAfter
        }
    }

    private let shared: SidecarShared
    private let side: ProxySide
    private var context: ChannelHandlerContext!
    private var pools: LoopResources!
    private var phase = Phase.readingHead
    private var exchange: Exchange?
    private var inbound: ByteBuffer?
    private var readPaused = false
    private var upstreamWritable = true
    private var draining = false
    private var peer = "unknown"
    private var ids = IDGenerator()
    private var processing = false
    private var headScratch: ByteBuffer?

    static let maxHead = 64 << 10
    static let maxBufferedAhead = 256 << 10
    static let maxReplayBody = 64 << 10

    init(shared: SidecarShared, side: ProxySide) {
        self.shared = shared
        self.side = side
    }

    var wantsDecodedBody: Bool { false }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.pools = shared.resources(for: context.eventLoop)
        peer = context.channel.remoteAddress?.ipAddress ?? "unknown"
        shared.register(self)
        if shared.draining.load(ordering: .relaxed) { draining = true }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        shared.unregister(self)
    }

    func channelInactive(context: ChannelHandlerContext) {
        phase = .closed
        timer?.cancel()  // it holds this handler: let a closed connection go now, not at the deadline
        timer = nil
        if let current = exchange {
            exchange = nil
            finishExchange(current, outcome: .abandoned, code: 499)
            current.connection?.close()
        }
        shared.unregister(self)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if inbound == nil || inbound!.readableBytes == 0 {
            inbound = incoming
        } else {
            inbound!.writeBuffer(&incoming)
        }
        process()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.connection?.setAutoRead(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func beginDrain() {
        context.eventLoop.execute { [self] in
            draining = true
            if phase == .readingHead, (inbound?.readableBytes ?? 0) == 0 {
                close()
            } else {
                exchange?.closeAfter = true
            }
        }
    }

    // MARK: requests

    private func process() {
        guard !processing else { return }
        processing = true
        defer { processing = false }
        while phase == .readingHead, let buffer = inbound, buffer.readableBytes > 0 {
            let dropCaller = side == .outbound
            let scan: Result<(ProxyRequestHead, Int)?, ProxyRequestHead.ParseError> = buffer.withUnsafeReadableBytes { bytes in
                guard let end = HTTPBytes.endOfHead(bytes) else { return .success(nil) }
                do throws(ProxyRequestHead.ParseError) {
                    return .success((try ProxyRequestHead.parse(bytes, headEnd: end, dropCaller: dropCaller), end))
                } catch {
                    return .failure(error)
                }
            }
            switch scan {
            case .failure(let error):
                respond(status: error.status, body: errorBody(error.message, upstream: nil), close: true)
                return
            case .success(nil):
                if buffer.readableBytes > Self.maxHead {
                    respond(status: 431, body: errorBody("request head exceeds 64 KiB", upstream: nil), close: true)
                }
                return
            case .success(let (_, end)?) where end > Self.maxHead:
                // The limit holds however the head arrived, all at once included.
                respond(status: 431, body: errorBody("request head exceeds 64 KiB", upstream: nil), close: true)
                return
            case .success(let (head, end)?):
                let rawHead = inbound!.readSlice(length: end)!
                if inbound!.readableBytes == 0 { inbound = nil }
                start(head, rawHead: rawHead)
            }
        }
        if phase == .forwarding { pumpBody() }
        updateReading()
    }

    private func start(_ head: ProxyRequestHead, rawHead: ByteBuffer) {
        let closeAfter = !head.keepAlive || draining
        let cluster: UpstreamCluster
        switch side {
        case .outbound:
            guard let host = head.host, !host.isEmpty else {
                respond(status: 400, body: errorBody("name the upstream service in the Host header", upstream: nil), close: head.hasBody || closeAfter)
                return
            }
            guard let found = shared.directory.cluster(host) else {
                respond(status: 503, body: errorBody("too many upstreams", upstream: host), close: head.hasBody || closeAfter)
                return
            }
            cluster = found
        case .inbound:
            guard let app = shared.app else {
                respond(status: 503, body: errorBody("no app behind this sidecar (--app-port)", upstream: nil), close: true)
                return
            }
            cluster = app
        }
        phase = .resolving
        if cluster.isResolved {
            admit(head, rawHead: rawHead, cluster: cluster, closeAfter: closeAfter)
        } else {
            let loop = context.eventLoop
            let bound = NIOLoopBound(self, eventLoop: loop)
            let boundHead = NIOLoopBound((head, rawHead), eventLoop: loop)
            cluster.whenResolved { resolved in
                loop.execute {
                    let handler = bound.value
                    guard handler.phase == .resolving else { return }
                    if resolved {
                        handler.admit(boundHead.value.0, rawHead: boundHead.value.1, cluster: cluster, closeAfter: closeAfter)
                    } else {
                        handler.respond(status: 503, body: errorBody(Refusal.registryUnavailable(cluster.name).message, upstream: cluster.name),
                                        close: boundHead.value.0.hasBody || closeAfter)
                    }
                    // Requests pipelined behind this one (when it was answered at once).
                    if handler.phase == .readingHead { handler.process() }
                }
            }
        }
    }

    private func admit(_ head: ProxyRequestHead, rawHead: ByteBuffer, cluster: UpstreamCluster, closeAfter: Bool) {
        let now = SidecarClock.now()
        var admittedInbound = false
        if side == .inbound {
            switch shared.limits.admit(caller: head.caller ?? peer, now: now) {
            case .admitted:
                admittedInbound = true
            case .overConcurrency(let limit):
                cluster.metrics.recordRequest(code: 503, nanoseconds: 0)
                respond(status: 503, body: errorBody("the app is serving \(limit) requests (inbound.max_concurrency): refused", upstream: nil),
                        close: head.hasBody || closeAfter, retryAfter: 1)
                return
            case .rateLimited(let caller, let retryAfter):
                cluster.metrics.recordRequest(code: 429, nanoseconds: 0)
                respond(status: 429, body: errorBody("rate limit exceeded for caller \(caller)", upstream: nil),
                        close: head.hasBody || closeAfter, retryAfter: retryAfter)
                return
            }
        }
        if let refusal = cluster.admit(now: now) {
            if admittedInbound { shared.limits.release() }
            shared.logger.info("request refused", metadata: ["upstream": "\(cluster.name)", "reason": "\(refusal.message)"])
            respond(status: 503, body: errorBody(refusal.message, upstream: cluster.name), close: head.hasBody || closeAfter, retryAfter: 1)
            return
        }
        shared.inFlight.add(1, ordering: .relaxed)
        let policy = cluster.policy
        // The call's deadline: the upstream's timeout, never past the caller's own deadline.
        let nowMs = EpochClock.nowMs()
        var budgetMs = Int(policy.timeout.components.seconds) * 1000 + Int(policy.timeout.components.attoseconds / 1_000_000_000_000_000)
        if let callerDeadline = head.deadlineEpochMs { budgetMs = max(0, min(budgetMs, callerDeadline - nowMs)) }
        let requestID = head.requestID ?? ids.requestID()
        var hashKey: String?
        if let name = policy.hashHeader, policy.balance == .consistentHash {
            hashKey = rawHead.withUnsafeReadableBytes { ProxyRequestHead.headerValue($0, headEnd: $0.count, name: Array(name.utf8)) }
        }
        let upstreamHead = makeUpstreamHead(head, rawHead: rawHead, deadlineEpochMs: nowMs + budgetMs, requestID: head.requestID == nil ? requestID : nil)
        let current = Exchange(
            head: head, cluster: cluster, policy: policy, upstreamHead: upstreamHead, hashKey: hashKey, requestID: requestID,
            startedAt: now, deadline: now + UInt64(budgetMs) * 1_000_000,
            retryable: policy.mayRetry(method: head.method, path: head.target, grpc: false), closeAfter: closeAfter)
        current.admittedInbound = admittedInbound
        exchange = current
        armDeadlineTimer(current.deadline)
        if head.expectContinue {
            var interim = context.channel.allocator.buffer(capacity: 25)
            interim.writeStatic("HTTP/1.1 100 Continue\r\n\r\n")
            context.writeAndFlush(wrapOutboundOut(interim), promise: nil)
        }
        attempt(current)
    }

    /// The request head for endpoints: request line and the caller's header lines as they were (minus hop-by-hop),
    /// plus the deadline, a trace context when the caller sent none, a request id and the caller's name.
    private func makeUpstreamHead(_ head: ProxyRequestHead, rawHead: ByteBuffer, deadlineEpochMs: Int, requestID: String?) -> ByteBuffer {
        // The previous request's head buffer is reused once the endpoint connection has written it.
        var out = headScratch ?? context.channel.allocator.buffer(capacity: rawHead.readableBytes + 200)
        headScratch = nil
        out.clear()
        out.writeString(head.method)
        out.writeStatic(" ")
        out.writeString(head.target)
        out.writeStatic(" HTTP/1.1\r\n")
        rawHead.withUnsafeReadableBytes { bytes in
            var lineEnd = 0
            while bytes[lineEnd] != HTTPBytes.lf { lineEnd += 1 }
            for span in head.keptSpans where span.lowerBound > lineEnd {
                out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[span]))
            }
        }
        out.writeStatic("X-Apus-Deadline-Ms: ")
        out.writeDecimal(deadlineEpochMs)
        out.writeStatic("\r\n")
        if side == .outbound {
            if !head.hasTraceparent {
                out.writeStatic("traceparent: ")
                ids.writeTraceparent(to: &out)
                out.writeStatic("\r\n")
            }
            if let requestID {
                out.writeStatic("x-request-id: ")
                out.writeString(requestID)
                out.writeStatic("\r\n")
            }
            if let caller = shared.callerName {
                out.writeStatic("x-apus-caller: ")
                out.writeString(caller)
                out.writeStatic("\r\n")
            }
        }
        if head.isHTTP10, !head.hasBody, head.method != "GET", head.method != "HEAD" {
            out.writeStatic("Content-Length: 0\r\n")
        }
        out.writeStatic("\r\n")
        return out
    }

    private func attempt(_ current: Exchange) {
        let now = SidecarClock.now()
        guard let endpoint = current.cluster.pick(hashKey: current.hashKey, tried: current.tried, now: now) else {
            failExchange(current, status: 503, message: current.cluster.noEndpointReason.message, outcome: .failure)
            return
        }
        current.attempts += 1
        current.endpoint = endpoint
        current.tried.append(endpoint.id)
        connect(current, to: endpoint, reuseIdle: true)
    }

    private func connect(_ current: Exchange, to endpoint: ServiceEndpoint, reuseIdle: Bool) {
        phase = .connecting
        let key = "\(endpoint.address):\(endpoint.port)"
        if reuseIdle, let connection = pools.http1.idleConnection(key: key) {
            send(current, on: connection)
            return
        }
        pools.http1.connect(key: key, host: endpoint.address, port: endpoint.port) { [self] result in
            guard phase == .connecting, exchange === current else {
                if case .success(let connection) = result { pools.http1.release(connection) }
                return
            }
            switch result {
            case .success(let connection):
                send(current, on: connection)
            case .failure(let error):
                attemptFailed(current, reason: "connect to \(key) failed: \(describeConnectError(error))", nothingSent: true, status: 503)
            }
        }
    }

    private func send(_ current: Exchange, on connection: HTTP1UpstreamConnection) {
        current.connection = connection
        connection.begin(sink: self, requestWasHEAD: current.head.method == "HEAD")
        phase = .forwarding
        connection.write(current.upstreamHead, flush: current.bodyDone && current.bodyCopy.isEmpty)
        if !current.bodyCopy.isEmpty {
            for (index, part) in current.bodyCopy.enumerated() {
                connection.write(part, flush: index == current.bodyCopy.count - 1)
            }
        }
        pumpBody()
    }

    private func pumpBody() {
        guard let current = exchange, let connection = current.connection, !current.bodyDone, var buffer = inbound else { return }
        var sent: ByteBuffer?
        switch current.bodyFraming {
        case .none, .untilClose:
            current.bodyDone = true
        case .length(let remaining):
            let take = min(remaining, buffer.readableBytes)
            if take > 0 { sent = buffer.readSlice(length: take)! }
            current.bodyFraming = .length(remaining: remaining - take)
            current.bodyDone = remaining == take
        case .chunked(var scanner):
            let consumed: Int
            do {
                consumed = try buffer.withUnsafeReadableBytes { bytes throws(ChunkedBodyScanner.ScanError) in try scanner.scan(bytes) }
            } catch {
                inbound = buffer
                current.closeAfter = true
                failExchange(current, status: 400, message: "malformed chunked request body", outcome: .abandoned)
                return
            }
            if consumed > 0 { sent = buffer.readSlice(length: consumed)! }
            current.bodyFraming = .chunked(scanner)
            current.bodyDone = scanner.isDone
        }
        if let sent {
            connection.write(sent, flush: true)
            if current.bodyReplayable {
                current.bodyCopyBytes += sent.readableBytes
                if current.bodyCopyBytes <= Self.maxReplayBody {
                    current.bodyCopy.append(sent)
                } else {
                    current.bodyReplayable = false
                    current.bodyCopy = []
                }
            }
        }
        inbound = buffer.readableBytes == 0 ? nil : buffer
        updateReading()
    }

    private func updateReading() {
        guard phase != .closed else { return }
        let ahead = inbound?.readableBytes ?? 0
        let shouldPause = !upstreamWritable || (readPaused ? ahead > Self.maxBufferedAhead / 2 : ahead > Self.maxBufferedAhead)
        guard shouldPause != readPaused else { return }
        readPaused = shouldPause
        context.channel.setOption(ChannelOptions.autoRead, value: !shouldPause).whenFailure { _ in }
    }

    // MARK: retries

    /// Whether the failed attempt may be made again elsewhere, and if so takes a retry from the budget.
    private func mayRetry(_ current: Exchange, nothingSent: Bool) -> Bool {
        guard !current.responseStarted, current.attempts < current.policy.attempts else { return false }
        guard nothingSent || (current.retryable && current.bodyReplayable && current.bodyDone) else { return false }
        let now = SidecarClock.now()
        guard now < current.deadline else { return false }
        return current.cluster.tryRetry(now: now)
    }

    private func attemptFailed(_ current: Exchange, reason: String, nothingSent: Bool, status: Int) {
        let now = SidecarClock.now()
        if let endpoint = current.endpoint { current.cluster.attemptEnded(endpoint.id, .failure, now: now) }
        current.connection = nil
        if mayRetry(current, nothingSent: nothingSent) {
            shared.logger.info("retrying", metadata: [
                "upstream": "\(current.cluster.name)", "requestID": "\(current.requestID)",
                "endpoint": "\(current.endpoint?.id ?? "")", "reason": "\(reason)", "attempt": "\(current.attempts + 1)",
            ])
            attempt(current)
            return
        }
        failExchange(current, status: status, message: "upstream \(current.cluster.name): \(reason)", outcome: .failure)
    }

    // MARK: the endpoint's answer

    func responseHead(_ head: ByteBuffer, status: Int, closeDelimited: Bool) -> Bool {
        guard let current = exchange else { return false }
        if current.policy.retryOn.contains(status), mayRetry(current, nothingSent: false) {
            let now = SidecarClock.now()
            if let endpoint = current.endpoint { current.cluster.attemptEnded(endpoint.id, .failure, now: now) }
            shared.logger.info("retrying", metadata: [
                "upstream": "\(current.cluster.name)", "requestID": "\(current.requestID)",
                "endpoint": "\(current.endpoint?.id ?? "")", "status": "\(status)", "attempt": "\(current.attempts + 1)",
            ])
            current.connection = nil
            context.eventLoop.execute { [self] in
                if exchange === current { attempt(current) }
            }
            return false
        }
        current.responseStarted = true
        current.status = status
        if closeDelimited || !current.bodyDone { current.closeAfter = true }
        var out = head
        if current.closeAfter {
            out.writeStatic("Connection: close\r\n")
        } else if current.head.isHTTP10 {
            out.writeStatic("Connection: keep-alive\r\n")
        }
        out.writeStatic("\r\n")
        context.write(wrapOutboundOut(out), promise: nil)
        return true
    }

    func responseBody(_ bytes: ByteBuffer) {
        context.write(wrapOutboundOut(bytes), promise: nil)
    }

    func responseFlush() {
        context.flush()
    }

    func responseComplete() {
        guard let current = exchange else { return }
        exchange = nil
        headScratch = current.upstreamHead
        let outcome: AttemptOutcome = current.policy.retryOn.contains(current.status) ? .failure : .success
        if let endpoint = current.endpoint { current.cluster.attemptEnded(endpoint.id, outcome, now: SidecarClock.now()) }
        if let connection = current.connection {
            if current.bodyDone { pools.http1.release(connection) } else { connection.close() }
        }
        finishExchange(current, outcome: outcome, code: current.status)
        upstreamWritable = true
        context.flush()
        if current.closeAfter || draining {
            close()
        } else {
            phase = .readingHead
            process()
        }
    }

    func responseFailed(_ reason: String, beforeHead: Bool) {
        guard let current = exchange else { return }
        if beforeHead, !current.responseStarted {
            if current.connection?.servedBefore == true, !current.staleRetried, current.bodyCopy.isEmpty, current.bodyDone,
               let endpoint = current.endpoint {
                // A pooled keep-alive connection the endpoint had closed meanwhile: the request never reached it.
                // Once, on a fresh connection to the same endpoint, outside the retry policy.
                current.staleRetried = true
                current.connection = nil
                connect(current, to: endpoint, reuseIdle: false)
                return
            }
            attemptFailed(current, reason: reason, nothingSent: false, status: 502)
            return
        }
        if let endpoint = current.endpoint { current.cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
        current.connection = nil
        failExchange(current, status: 502, message: "upstream \(current.cluster.name): \(reason)", outcome: .failure)
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        upstreamWritable = writable
        updateReading()
    }

    // MARK: endings

    /// One timer per connection, not per request: armed for the earliest deadline; when it fires it ends the
    /// current exchange if its deadline passed, or re-arms for it. Requests that finish in time cost nothing.
    private var timerDeadline: Nanos?
    private var timer: Scheduled<Void>?

    private func armDeadlineTimer(_ deadline: Nanos) {
        if let armed = timerDeadline, armed <= deadline { return }
        timerDeadline = deadline
        let now = SidecarClock.now()
        let delay = deadline > now ? Int64(deadline - now) : 0
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer?.cancel()
        timer = context.eventLoop.scheduleTask(in: .nanoseconds(delay)) { bound.value.deadlineTimerFired(armedFor: deadline) }
    }

    private func deadlineTimerFired(armedFor: Nanos) {
        guard timerDeadline == armedFor else { return }  // superseded by an earlier one
        timerDeadline = nil
        guard phase != .closed, let current = exchange else { return }
        if current.deadline <= SidecarClock.now() {
            timedOut(current)
        } else {
            armDeadlineTimer(current.deadline)
        }
    }

    private func timedOut(_ current: Exchange) {
        guard exchange === current, phase != .closed else { return }
        if let endpoint = current.endpoint, current.connection != nil || phase == .connecting {
            current.cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now())
        }
        current.connection?.close()
        current.connection = nil
        current.endpoint = nil
        let budget = (current.deadline - current.startedAt) / 1_000_000
        failExchange(current, status: 504, message: "upstream \(current.cluster.name) did not answer within \(budget) ms", outcome: .failure)
    }

    private func finishExchange(_ current: Exchange, outcome: AttemptOutcome, code: Int) {
        current.cluster.requestEnded(outcome, code: code, startedAt: current.startedAt, now: SidecarClock.now())
        if current.admittedInbound { shared.limits.release() }
        shared.inFlight.add(-1, ordering: .relaxed)
    }

    private func failExchange(_ current: Exchange, status: Int, message: String, outcome: AttemptOutcome) {
        guard exchange === current else { return }
        exchange = nil
        current.connection?.close()
        if let endpoint = current.endpoint, current.connection != nil {
            current.cluster.attemptEnded(endpoint.id, .abandoned, now: SidecarClock.now())
        }
        finishExchange(current, outcome: outcome, code: current.responseStarted ? current.status : status)
        shared.logger.warning("request failed", metadata: [
            "upstream": "\(current.cluster.name)", "requestID": "\(current.requestID)", "status": "\(status)", "reason": "\(message)",
        ])
        upstreamWritable = true
        if current.responseStarted {
            context.flush()
            close()
            return
        }
        respond(status: status, body: errorBody(message, upstream: current.cluster.name),
                close: current.closeAfter || !current.bodyDone || draining, retryAfter: status == 503 ? 1 : nil)
        if phase == .readingHead { process() }
    }

    private func respond(status: Int, body: String, close: Bool, retryAfter: Int? = nil) {
        var out = context.channel.allocator.buffer(capacity: body.utf8.count + 200)
        out.writeString("HTTP/1.1 \(status) \(reasonPhrase(status))\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nX-Apus-Sidecar: \(side == .outbound ? "outbound" : "inbound")\r\n")
        if let retryAfter { out.writeString("Retry-After: \(retryAfter)\r\n") }
        if close { out.writeStatic("Connection: close\r\n") }
        out.writeStatic("\r\n")
        out.writeString(body)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        if close {
            self.close()
        } else {
            phase = .readingHead
        }
    }

    private func close() {
        guard phase != .closed else { return }
        phase = .closed
        context.close(promise: nil)
    }
}
