import ApusCore
import ApusScheduler
import ApusWire
import Foundation
import Logging
import NIOCore

/// One client connection of the HTTP/1.1 edge. Reads request heads with the minimal codec, routes them, takes a
/// slot from the function version's pool, and relays the request to an instance over a pooled keep-alive
/// connection and the response back — header bytes copied, bodies passed through as they arrive. Requests on one
/// connection are served in order (pipelining is honoured, one exchange at a time). Lives on its event loop.
final class GatewayConnectionHandler: ChannelInboundHandler, RemovableChannelHandler, UpstreamExchange, LoopSlotTarget, DrainableConnection, DeadlineTarget {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase {
        case readingHead
        /// Reading the body of an asynchronous submission (`GatewayConnectionHandler+Async.swift`).
        case collectingAsync
        /// Waiting for the task store to take an asynchronous submission.
        case submittingAsync
        case waitingForSlot
        case connecting
        case forwarding
        case closed
    }

    /// One request/response in flight on this connection. A class: it is updated in place many times per request.
    private final class Exchange {
        let invocation: Invocation
        let version: FunctionVersion
        let pool: InstancePool
        let head: RequestHead
        let upstreamHead: ByteBuffer
        var bodyFraming: BodyFraming
        var bodyDone: Bool
        var lease: InstancePool.Lease?
        var upstream: UpstreamConnection?
        /// When the request's budget (the function's timeout) runs out.
        let deadline: ContinuousClock.Instant
        let budget: Duration
        var responseStarted = false
        var closeAfter: Bool
        var retried = false
        /// Waiting in the pool's queue: leaving means cancelling there.
        var queued = false
        /// The instance's status, once its response head arrived.
        var status = 0
        let arrivedAt = ContinuousClock.now

        init(invocation: Invocation, version: FunctionVersion, pool: InstancePool, head: RequestHead,
             upstreamHead: ByteBuffer, bodyFraming: BodyFraming, bodyDone: Bool, closeAfter: Bool,
             deadline: ContinuousClock.Instant, budget: Duration) {
            self.deadline = deadline
            self.budget = budget
            self.invocation = invocation
            self.version = version
            self.pool = pool
            self.head = head
            self.upstreamHead = upstreamHead
            self.bodyFraming = bodyFraming
            self.bodyDone = bodyDone
            self.closeAfter = closeAfter
        }
    }

    let shared: GatewayShared
    var context: ChannelHandlerContext!
    private var upstreams: UpstreamPool!
    var phase = Phase.readingHead
    /// The exchange in progress; while there is one, the connection is in its loop's `CallDeadlines`.
    private var exchange: Exchange? {
        didSet {
            if exchange != nil {
                if oldValue !== exchange { deadlines.add(self) }
            } else if deadlineSlot >= 0 {
                deadlines.remove(self)
            }
        }
    }
    private var deadlines: CallDeadlines!
    /// Where the loop's `CallDeadlines` keeps this connection (-1: not kept).
    var deadlineSlot = -1
    var deadline: ContinuousClock.Instant { exchange?.deadline ?? .now }
    /// Whether a request is being served (for `ConnectionTimeouts`).
    var hasExchangeInProgress: Bool { exchange != nil }
    var inbound: ByteBuffer?
    private var readPaused = false
    private var upstreamWritable = true
    var draining = false
    var peer = "unknown"
    /// Hears slot decisions for this connection's queued requests and brings them back onto its event loop.
    private var slotWaiter: LoopSlotWaiter!
    /// This connection's event loop's shard key (see `GatewayShared.shardKey(for:)`).
    private var shardKey: UInt64 = 0
    private var headScratch: ByteBuffer?

    /// The asynchronous submission being read or stored.
    var pendingAsync: PendingAsync?

    static let maxHead = 64 << 10
    static let maxBufferedAhead = 256 << 10

    /// `X-Forwarded-Proto` for requests of this connection (`http`, or `https` behind the TLS listener).
    private let scheme: String

    init(shared: GatewayShared, scheme: String = "http") {
        self.shared = shared
        self.scheme = scheme
    }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.upstreams = shared.upstreamPool(for: context.eventLoop)
        self.deadlines = shared.callDeadlines(for: context.eventLoop)
        self.slotWaiter = LoopSlotWaiter(NIOLoopBound<any LoopSlotTarget>(self, eventLoop: context.eventLoop))
        self.shardKey = shared.shardKey(for: context.eventLoop)
        if context.channel.isActive { becameActive(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        slotWaiter = nil  // it holds this handler: break the cycle
        if isRegistered { shared.unregister(id: ObjectIdentifier(self)) }
    }

    func channelActive(context: ChannelHandlerContext) {
        becameActive(context: context)
        context.fireChannelActive()
    }

    /// Added to a connection that is already open (after protocol detection or ALPN), or told it opened.
    private var isRegistered = false

    private func becameActive(context: ChannelHandlerContext) {
        guard !isRegistered else { return }
        isRegistered = true
        peer = context.channel.remoteAddress?.ipAddress ?? "unknown"
        shared.register(self, id: ObjectIdentifier(self), eventLoop: context.eventLoop)
    }

    func channelInactive(context: ChannelHandlerContext) {
        phase = .closed
        inbound = nil
        pendingAsync = nil
        heldBody.release(in: shared)
        if let current = exchange {
            // The client went away mid-exchange: give back what the exchange holds.
            releaseResources(of: current)
            current.pool.metrics.recordRequest(protocol: "http", code: Self.clientClosedCode, since: current.arrivedAt)
            exchange = nil
        }
        shared.unregister(id: ObjectIdentifier(self))
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
        countHeldBodyBytes()
    }

    /// Request body bytes this connection holds in memory and counts in the gateway's `httpBodies` budget: what
    /// was read ahead past `BufferedBytesBudget.freePerConnection`, and an asynchronous body being collected.
    private(set) var heldBody = HeldBodyBytes()

    /// Re-counts what this connection holds after a read; past the gateway's limit the request is refused (429)
    /// and the connection closed.
    func countHeldBodyBytes() {
        guard phase != .closed else { return }
        let ahead = max(0, (inbound?.readableBytes ?? 0) - BufferedBytesBudget.freePerConnection)
        let held = ahead + (pendingAsync.map { $0.raw.count + $0.submission.payload.count } ?? 0)
        if heldBody.set(held, in: shared) { return }
        let error = GatewayShared.bodyBufferFull(shared.configuration.httpMaxBufferedBytes)
        if exchange != nil {
            failExchange(error, forceClose: true)
        } else {
            let requestID = pendingAsync?.submission.requestID
            pendingAsync = nil
            respondWithError(error, requestID: requestID, version: nil, close: true)
        }
        inbound = nil
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A slow client slows the instance: stop reading the response while the client cannot take more.
        exchange?.upstream?.setAutoRead(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Graceful shutdown: an idle connection closes now, a busy one after its current response.
    func beginDrain() {
        draining = true
        if phase == .readingHead, (inbound?.readableBytes ?? 0) == 0 {
            close()
        } else {
            exchange?.closeAfter = true
        }
    }

    // MARK: reading requests

    private var processing = false

    /// Serves whatever complete requests are buffered. Not re-entrant: a nested call (an exchange that ended while
    /// `start` ran) leaves the work to the loop already running.
    func process() {
        guard !processing else { return }
        processing = true
        defer { processing = false }
        while phase == .readingHead, let buffer = inbound, buffer.readableBytes > 0 {
            let scan: Result<(RequestHead, Int)?, RequestHead.ParseError> = buffer.withUnsafeReadableBytes { bytes in
                guard let end = HTTPBytes.endOfHead(bytes) else { return .success(nil) }
                do throws(RequestHead.ParseError) {
                    return .success((try RequestHead.parse(bytes, headEnd: end, maxBody: shared.configuration.maxRequestBytes), end))
                } catch {
                    return .failure(error)
                }
            }
            switch scan {
            case .failure(let error):
                let code: ApusError.Code = error.status == 413 ? .tooLarge : .badRequest
                respondWithError(ApusError(code, error.message), requestID: nil, version: nil, status: error.status, close: true)
                return
            case .success(nil):
                if buffer.readableBytes > Self.maxHead {
                    respondWithError(ApusError(.badRequest, "request head exceeds 64 KiB"), requestID: nil, version: nil, status: 431, close: true)
                }
                return
            case .success(let (head, end)?):
                guard end <= Self.maxHead else {
                    // The whole head arrived at once, but it is larger than a head may be.
                    respondWithError(ApusError(.badRequest, "request head exceeds 64 KiB"), requestID: nil, version: nil, status: 431, close: true)
                    return
                }
                let rawHead = inbound!.readSlice(length: end)!
                if inbound!.readableBytes == 0 { inbound = nil }  // lets the channel reuse its receive buffer
                start(head, rawHead: rawHead)
            }
        }
        if phase == .forwarding { pumpBody() }
        if phase == .collectingAsync { collectAsyncBody() }
        updateReading()
    }

    func nextRoll() -> Int {
        shared.roll(on: context.eventLoop)
    }

    /// The route, invocation and dispatch of an HTTP/1.1 request.
    static func resolve(
        _ head: inout RequestHead, requestID: String, shared: GatewayShared, roll: Int
    ) throws(ApusError) -> (GatewayRoute, Invocation, Dispatcher.Dispatch) {
        let route = try GatewayRoute.resolve(host: head.host, uri: head.target, domain: shared.configuration.domain, catalog: shared.scheduler.catalog)
        if try !shared.authorizeInvocation(function: route.function, credential: head.authorization) { head.dropAuthorization() }
        var invocation = Invocation(requestID: requestID, function: route.function, pinnedVersion: try head.pinnedVersionNumber(),
                                    method: head.method, path: route.instancePath)
        let dispatch = try shared.dispatcher.dispatch(&invocation, roll: roll)
        return (route, invocation, dispatch)
    }

    private func start(_ head: RequestHead, rawHead: ByteBuffer) {
        var head = head
        if head.upgradeToH2C, case .none = head.framing, !draining, upgradeToHTTP2(head, rawHead: rawHead) {
            return
        }
        if head.asyncInvocation || head.target.hasPrefix(Self.asyncPrefix) {
            startAsync(head, rawHead: rawHead)
            return
        }
        let requestID = shared.requestIDs.next()
        let hasBody: Bool
        if case .none = head.framing { hasBody = false } else { hasBody = true }
        let invocation: Invocation
        let dispatch: Dispatcher.Dispatch
        let route: GatewayRoute
        do throws(ApusError) {
            (route, invocation, dispatch) = try Self.resolve(&head, requestID: requestID, shared: shared, roll: nextRoll())
        } catch {
            respondWithError(error, requestID: requestID, version: nil, close: hasBody || !head.keepAlive || draining)
            return
        }
        let version = dispatch.version
        let upstreamHead = makeUpstreamHead(head, rawHead: rawHead, route: route, requestID: requestID, version: version)
        exchange = Exchange(
            invocation: invocation, version: version, pool: dispatch.pool, head: head, upstreamHead: upstreamHead,
            bodyFraming: head.framing, bodyDone: !hasBody, closeAfter: !head.keepAlive || draining,
            deadline: dispatch.deadline, budget: dispatch.budget)
        if head.expectContinue {
            var interim = context.channel.allocator.buffer(capacity: 25)
            interim.writeStatic("HTTP/1.1 100 Continue\r\n\r\n")
            context.writeAndFlush(wrapOutboundOut(interim), promise: nil)
        }

        acquireSlot(exchange!)
    }

    private func acquireSlot(_ current: Exchange) {
        switch current.pool.acquire(
            requestID: current.invocation.requestID, deadline: current.invocation.deadline!, waiter: slotWaiter,
            shard: shardKey) {
        case .leased(let lease):
            phase = .connecting
            current.lease = lease
            connect()
        case .failed(let error):
            failExchange(error)
        case .queued:
            current.queued = true
            phase = .waitingForSlot
        }
    }

    /// Answers `Upgrade: h2c` with 101 and turns this connection into an HTTP/2 one whose stream 1 is the request
    /// that asked. Returns false (serve it as HTTP/1.1) when the head cannot be carried in one HEADERS frame.
    private func upgradeToHTTP2(_ head: RequestHead, rawHead: ByteBuffer) -> Bool {
        var fields: [(String, String)] = [(":method", head.method), (":scheme", scheme), (":path", head.target)]
        if let host = head.host { fields.append((":authority", host)) }
        rawHead.withUnsafeReadableBytes { bytes in
            head.keptSpans.forEach { span in
                // A span may cover several adjacent header lines.
                let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[span]), as: UTF8.self)
                for line in text.split(separator: "\r\n", omittingEmptySubsequences: true) {
                    guard let colon = line.firstIndex(of: ":") else { continue }
                    let name = line[..<colon].lowercased()
                    guard name != "host", name != "transfer-encoding", name != "content-length" else { continue }
                    fields.append((name, line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)))
                }
            }
        }
        if let pinned = head.pinnedVersion { fields.append(("x-apus-version", pinned)) }
        if let forwardedFor = head.forwardedFor { fields.append(("x-forwarded-for", forwardedFor)) }
        guard let frame = H2CUpgradeSplicer.headersFrame(fields, allocator: context.channel.allocator) else { return false }

        var switching = context.channel.allocator.buffer(capacity: 80)
        switching.writeStatic("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        context.writeAndFlush(wrapOutboundOut(switching), promise: nil)
        let channel = context.channel
        do {
            try channel.pipeline.syncOperations.addHandler(H2CUpgradeSplicer(stream1HeadersFrame: frame))
            try EdgePipeline.configureHTTP2(channel, shared: shared, scheme: scheme)
        } catch {
            close()
            return true
        }
        phase = .closed  // this handler is done; HTTP/2 owns the connection
        let rest = inbound
        inbound = nil
        if let rest, rest.readableBytes > 0 { context.fireChannelRead(NIOAny(rest)) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        return true
    }

    /// Rewrites the head for the instance: new request line, the client's header lines as they were (minus
    /// hop-by-hop and `X-Apus-*`), and the forwarding and platform headers.
    private func makeUpstreamHead(_ head: RequestHead, rawHead: ByteBuffer, route: GatewayRoute, requestID: String, version: FunctionVersion) -> ByteBuffer {
        // Reuse the previous request head's storage once the instance connection has written it.
        var out = headScratch ?? context.channel.allocator.buffer(capacity: rawHead.readableBytes + 320)
        headScratch = nil
        out.clear()
        Self.writeUpstreamHead(
            into: &out, head, rawHead: rawHead, route: route, requestID: requestID, function: version.function,
            versionNumber: version.number, timeoutMilliseconds: version.manifest.timeout.milliseconds, peer: peer, scheme: scheme,
            wallClockMilliseconds: Int64(Date().timeIntervalSince1970 * 1000))
        headScratch = out
        return out
    }

    /// The request head an instance gets (shared with the edge reactor): appended to `out`.
    static func writeUpstreamHead(
        into out: inout ByteBuffer, _ head: RequestHead, rawHead: ByteBuffer, route: GatewayRoute, requestID: String,
        function: String, versionNumber: Int, timeoutMilliseconds: Int64, peer: String, scheme: String,
        wallClockMilliseconds: Int64
    ) {
        // One reservation and plain copies into it: each separate ByteBuffer write pays its own uniqueness,
        // capacity and exclusivity checks, and this runs for every request.
        var capacity = rawHead.readableBytes + head.method.utf8.count + route.instancePath.utf8.count + peer.utf8.count
        capacity += (head.forwardedFor?.utf8.count ?? 0) + (head.host?.utf8.count ?? 0) + route.function.utf8.count
        capacity += requestID.utf8.count + function.utf8.count + scheme.utf8.count + 256
        let deadlineMs = Int(wallClockMilliseconds + timeoutMilliseconds)
        rawHead.withUnsafeReadableBytes { raw in
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: capacity) { space in
                var w = HeadWriter(space)
                w.add(head.method)
                w.add(" ")
                w.add(route.instancePath)
                w.add(" HTTP/1.1\r\n")
                head.keptSpans.forEach { span in w.add(UnsafeRawBufferPointer(rebasing: raw[span])) }
                w.add("X-Forwarded-For: ")
                if let previous = head.forwardedFor {
                    w.add(previous)
                    w.add(", ")
                }
                w.add(peer)
                if let host = head.host {
                    w.add("\r\nX-Forwarded-Host: ")
                    w.add(host)
                }
                w.add("\r\nX-Forwarded-Proto: ")
                w.add(scheme)
                if route.routedByPath {
                    w.add("\r\nX-Forwarded-Prefix: /")
                    w.add(route.function)
                }
                w.add("\r\nX-Apus-Request-Id: ")
                w.add(requestID)
                w.add("\r\nX-Apus-Function: ")
                w.add(function)
                w.add("\r\nX-Apus-Version: ")
                w.addDecimal(versionNumber)
                w.add("\r\nX-Apus-Deadline-Ms: ")
                w.addDecimal(deadlineMs)
                w.add("\r\n\r\n")
                return w.count
            }
        }
    }

    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
        guard phase == .waitingForSlot, let current = exchange, current.invocation.requestID == requestID else {
            // The request is gone (client left, deadline passed): give the slot back.
            if case .success(let lease) = result, let pool = orphanPools.removeValue(forKey: requestID) { pool.release(lease) }
            return
        }
        current.queued = false
        switch result {
        case .success(let lease):
            current.lease = lease
            phase = .connecting
            connect()
        case .failure(let error):
            failExchange(error)
        }
    }

    /// Requests that ended while their slot decision was already on its way back: the lease goes back here.
    private var orphanPools: [String: InstancePool] = [:]

    private func connect() {
        guard let current = exchange, let lease = current.lease else { return }
        if let connection = upstreams.idleConnection(instanceID: lease.instanceID) {
            send(current, on: connection)
            return
        }
        let requestID = current.invocation.requestID
        upstreams.connect(instanceID: lease.instanceID, endpoint: lease.endpoint) { [self] result in
            guard phase == .connecting, let current = exchange, current.invocation.requestID == requestID else {
                if case .success(let connection) = result { upstreams.release(connection) }
                return
            }
            switch result {
            case .success(let connection):
                send(current, on: connection)
            case .failure(let error):
                // Nothing was sent, so another instance may serve the request whatever its method: the instance
                // died or stopped listening before its exit was noticed.
                current.pool.reportUnreachable(lease)
                current.lease = nil
                if current.retried {
                    failExchange(ApusError(.instanceError, "cannot connect to instance \(lease.instanceID): \(error)"))
                } else {
                    current.retried = true
                    acquireSlot(current)
                }
            }
        }
    }

    private func send(_ current: Exchange, on connection: UpstreamConnection) {
        current.upstream = connection
        connection.begin(exchange: self, requestWasHEAD: current.head.isHEAD)
        phase = .forwarding
        connection.write(current.upstreamHead, flush: current.bodyDone)
        pumpBody()
    }

    /// Moves request body bytes that have arrived to the instance, as far as the framing allows.
    private func pumpBody() {
        guard let current = exchange, let upstream = current.upstream, !current.bodyDone, var buffer = inbound else { return }
        switch current.bodyFraming {
        case .none, .untilClose:
            current.bodyDone = true
        case .length(let remaining):
            let take = min(remaining, buffer.readableBytes)
            if take > 0 { upstream.write(buffer.readSlice(length: take)!, flush: true) }
            current.bodyFraming = .length(remaining: remaining - take)
            current.bodyDone = remaining == take
        case .chunked(var scanner):
            let consumed: Int
            do {
                consumed = try buffer.withUnsafeReadableBytes { bytes throws(ChunkedBodyScanner.ScanError) in try scanner.scan(bytes) }
            } catch {
                inbound = buffer
                let tooLarge = error == .tooLarge
                failExchange(tooLarge
                    ? ApusError(.tooLarge, "request body exceeds the \(shared.configuration.maxRequestBytes)-byte limit")
                    : ApusError(.badRequest, "malformed chunked request body"), forceClose: true)
                return
            }
            if consumed > 0 { upstream.write(buffer.readSlice(length: consumed)!, flush: true) }
            current.bodyFraming = .chunked(scanner)
            current.bodyDone = scanner.isDone
        }
        inbound = buffer.readableBytes == 0 ? nil : buffer
        updateReading()
    }

    /// Reading from the client pauses while too much is buffered ahead or the instance cannot take more bytes.
    func updateReading() {
        guard phase != .closed else { return }
        let ahead = inbound?.readableBytes ?? 0
        let shouldPause = !upstreamWritable || (readPaused ? ahead > Self.maxBufferedAhead / 2 : ahead > Self.maxBufferedAhead)
        guard shouldPause != readPaused else { return }
        readPaused = shouldPause
        context.channel.setOption(ChannelOptions.autoRead, value: !shouldPause).whenFailure { _ in }
    }

    // MARK: the instance's answer

    func upstreamHead(_ out: inout ByteBuffer, status: Int, closeDelimited: Bool) {
        guard let current = exchange else { return }
        current.responseStarted = true
        current.status = status
        if closeDelimited || !current.bodyDone { current.closeAfter = true }
        Self.endResponseHead(&out, version: current.version.number, requestID: current.invocation.requestID,
                             close: current.closeAfter, http10: current.head.isHTTP10)
        context.write(wrapOutboundOut(out), promise: nil)
    }

    /// Appends the gateway's response headers and the blank line to an instance's response head (shared with the
    /// edge reactor).
    static func endResponseHead(_ out: inout ByteBuffer, version: Int, requestID: String, close: Bool, http10: Bool) {
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: requestID.utf8.count + 96) { space in
            var w = HeadWriter(space)
            w.add("X-Apus-Version: ")
            w.addDecimal(version)
            w.add("\r\nX-Apus-Request-Id: ")
            w.add(requestID)
            if close {
                w.add("\r\nConnection: close")
            } else if http10 {
                w.add("\r\nConnection: keep-alive")
            }
            w.add("\r\n\r\n")
            return w.count
        }
    }

    func upstreamBody(_ bytes: ByteBuffer) {
        context.write(wrapOutboundOut(bytes), promise: nil)
    }

    func upstreamFlush() {
        context.flush()
    }

    func upstreamComplete(reusable: Bool) {
        guard let current = exchange else { return }
        if let lease = current.lease { current.pool.release(lease) }
        current.pool.metrics.recordHTTPRequest(status: current.status, since: current.arrivedAt)
        if let upstream = current.upstream {
            if reusable && current.bodyDone { upstreams.release(upstream) } else { upstream.close() }
        }
        exchange = nil
        upstreamWritable = true
        context.flush()
        if current.closeAfter || draining {
            close()
        } else {
            phase = .readingHead
            process()
        }
    }

    func upstreamFailed(_ reason: String) {
        guard let current = exchange else { return }
        let failure = shared.instanceFailure(reason, instanceID: current.lease?.instanceID)
        if !failure.known, !current.responseStarted, !current.retried, current.upstream?.servedBefore == true, case .none = current.head.framing {
            // A kept-alive connection the instance had already closed: try once more on a fresh one.
            current.retried = true
            current.upstream = nil
            phase = .connecting
            connect()
            return
        }
        current.upstream = nil
        shared.settleInstanceFailure(reason, instanceID: current.lease?.instanceID, on: context.eventLoop) { [self] error, _ in
            guard exchange === current else { return }  // ended meanwhile (deadline, client gone)
            failExchange(error)
        }
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        // A slow instance slows the client: stop reading its body while the instance cannot take more.
        upstreamWritable = writable
        updateReading()
    }

    // MARK: endings

    /// The exchange's deadline passed (the loop's `CallDeadlines` keeps one timer for all its connections).
    func deadlinePassed() {
        guard phase != .closed, let current = exchange else { return }
        failExchange(ApusError(.deadlineExceeded, "function did not answer within its timeout of \(current.budget.humanReadable)"))
    }

    /// Ends the current exchange with an error: the client gets it as JSON unless the response already began.
    private func failExchange(_ error: ApusError, forceClose: Bool = false) {
        guard let current = exchange else { return }
        releaseResources(of: current)
        exchange = nil
        // A response already under way ends cut short: the client sees the instance's status on a broken body.
        current.pool.metrics.recordRequest(
            protocol: "http", code: current.responseStarted ? Self.statusCode(current.status) : Self.statusCode(error.code.httpStatus),
            since: current.arrivedAt)
        shared.logger.info("request failed", metadata: [
            "requestID": "\(current.invocation.requestID)", "function": "\(current.version.function)",
            "version": "\(current.version.number)", "code": "\(error.code)", "reason": "\(error.message)",
        ])
        if current.responseStarted {
            context.flush()
            close()
            return
        }
        let close = forceClose || current.closeAfter || !current.bodyDone || draining
        respondWithError(error, requestID: current.invocation.requestID, version: current.version.number, close: close)
        if phase == .readingHead { process() }  // requests pipelined behind the failed one
    }

    private func releaseResources(of current: Exchange) {
        upstreamWritable = true
        if let lease = current.lease {
            current.pool.release(lease)
        } else if current.queued {
            if !current.pool.cancel(requestID: current.invocation.requestID) {
                orphanPools[current.invocation.requestID] = current.pool
            }
        }
        current.upstream?.close()
    }

    func respondWithError(_ error: ApusError, requestID: String?, version: Int?, status: Int? = nil, close: Bool) {
        let out = Self.errorResponse(error, requestID: requestID, version: version, status: status, close: close, allocator: context.channel.allocator)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        if close {
            self.close()
        } else {
            phase = .readingHead
        }
    }

    /// A complete JSON error response (shared with the edge reactor).
    static func errorResponse(
        _ error: ApusError, requestID: String?, version: Int?, status: Int? = nil, close: Bool, allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        let body = error.jsonBody + "\n"
        var out = allocator.buffer(capacity: body.utf8.count + 200)
        let code = status ?? error.code.httpStatus
        out.writeString("HTTP/1.1 \(code) \(Self.reason(code))\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n")
        if let requestID { out.writeString("X-Apus-Request-Id: \(requestID)\r\n") }
        if let version { out.writeString("X-Apus-Version: \(version)\r\n") }
        if error.code == .overloaded || error.code == .unavailable { out.writeStatic("Retry-After: 1\r\n") }
        if error.code == .unauthenticated { out.writeString("WWW-Authenticate: \(ApusError.bearerChallenge)\r\n") }
        if close { out.writeStatic("Connection: close\r\n") }
        out.writeStatic("\r\n")
        out.writeString(body)
        return out
    }

    func close() {
        guard phase != .closed else { return }
        phase = .closed
        context.close(promise: nil)
    }

    /// The metrics code of a client that left before its response was complete (nginx's convention).
    static let clientClosedCode = "499"

    /// Status codes as metric labels, without formatting one per request.
    static let statusCodes: [String] = (0..<600).map { String($0) }

    static func statusCode(_ status: Int) -> String {
        status >= 0 && status < statusCodes.count ? statusCodes[status] : String(status)
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 400: "Bad Request"
        case 404: "Not Found"
        case 408: "Request Timeout"
        case 413: "Content Too Large"
        case 429: "Too Many Requests"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 502: "Bad Gateway"
        case 503: "Service Unavailable"
        case 504: "Gateway Timeout"
        case 505: "HTTP Version Not Supported"
        default: "Error"
        }
    }
}
