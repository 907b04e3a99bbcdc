import ApusWire
import ApusMesh
import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2

/// One HTTP/2 stream into the sidecar (HTTP over h2, or a gRPC call), either side. The target is named by
/// `apus-upstream` or `:authority` (outbound) or is the app (inbound). To endpoints that speak HTTP/2 (gRPC, h2)
/// frames pass through on a multiplexed connection; to HTTP/1.1 endpoints the request is re-framed as HTTP/1.1.
/// Request frames are kept (up to 64 KiB) so a failed attempt can be made again elsewhere. Lives on the client
/// connection's event loop, like the upstream streams it opens.
final class HTTP2StreamProxy: ChannelInboundHandler, HTTP1ResponseSink, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private enum Phase {
        case idle
        case resolving
        case connecting
        case relaying
        case finished
    }

    private let shared: SidecarShared
    private let side: ProxySide
    private let peer: String
    private var context: ChannelHandlerContext!
    private var pools: LoopResources!
    private var phase = Phase.idle

    private var requestHeaders = HPACKHeaders()
    private var isGRPC = false
    private var method = "GET"
    private var path = "/"
    private var authority = ""
    private var cluster: UpstreamCluster?
    private var policy = UpstreamPolicy.defaults
    private var requestID = ""
    private var startedAt: Nanos = 0
    private var deadline: Nanos = 0
    private var retryable = false
    private var hashKey: String?
    private var admittedInbound = false
    private var admitted = false
    private var timer: Scheduled<Void>?

    /// Client frames after HEADERS, kept for a retry while they fit.
    private var bodyFrames: [HTTP2Frame.FramePayload] = []
    private var bodyBytes = 0
    private var replayable = true
    /// Client frames that arrived while no attempt was relaying (nothing of them sent yet).
    private var pending: [HTTP2Frame.FramePayload] = []
    /// Some of the request already went to an endpoint (a later attempt replays `bodyFrames` instead of `pending`).
    private var anySent = false
    private var requestEnded = false
    private var attempts = 0
    private var tried: [String] = []
    private var endpoint: ServiceEndpoint?
    private var responseStarted = false
    private var responseEnded = false
    private var status = 0
    private var grpcStatus: Int?

    // Current attempt: HTTP/2 upstream stream or HTTP/1.1 connection.
    private var upstreamStream: (any Channel)?
    private var relay: UpstreamStreamRelay?
    private var http1: HTTP1UpstreamConnection?
    private var http1Chunked = false
    private var staleRetried = false

    static let maxReplayBody = 64 << 10

    init(shared: SidecarShared, side: ProxySide, peer: String) {
        self.shared = shared
        self.side = side
        self.peer = peer
    }

    var wantsDecodedBody: Bool { true }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.pools = shared.resources(for: context.eventLoop)
    }

    // MARK: client side

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let payload = unwrapInboundIn(data)
        switch payload {
        case .headers(let headers):
            if phase == .idle {
                requestEnded = headers.endStream
                start(headers.headers)
            } else {
                // Request trailers.
                requestEnded = requestEnded || headers.endStream
                forwardClientFrame(payload)
            }
        case .data(let data):
            requestEnded = requestEnded || data.endStream
            forwardClientFrame(payload)
        default:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // Client frames relayed during this read go out now (to an HTTP/2 stream or an HTTP/1.1 connection).
        upstreamStream?.flush()
        http1?.channel?.flush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A slow client slows the endpoint: stop reading its response while the client cannot take more.
        let writable = context.channel.isWritable
        upstreamStream?.setOption(ChannelOptions.autoRead, value: writable).whenFailure { _ in }
        http1?.setAutoRead(writable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if phase != .finished {
            endCall(outcome: .abandoned, code: 499)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if phase != .finished { endCall(outcome: .abandoned, code: 499) }
        context.close(promise: nil)
    }

    private func forwardClientFrame(_ payload: HTTP2Frame.FramePayload) {
        if replayable, !responseStarted {
            if case .data(let data) = payload, case .byteBuffer(let buffer) = data.data { bodyBytes += buffer.readableBytes }
            if bodyBytes <= Self.maxReplayBody {
                bodyFrames.append(payload)
            } else {
                replayable = false
                bodyFrames = []
            }
        }
        if phase == .relaying {
            sendToUpstream(payload, flush: false)
        } else {
            pending.append(payload)
        }
    }

    // MARK: routing

    private func start(_ headers: HPACKHeaders) {
        startedAt = SidecarClock.now()
        requestHeaders = headers
        method = headers.first(name: ":method") ?? "GET"
        path = headers.first(name: ":path") ?? "/"
        let contentType = headers.first(name: "content-type") ?? ""
        isGRPC = contentType.hasPrefix("application/grpc")
        requestID = headers.first(name: "x-request-id") ?? pools.ids.requestID()
        let target: UpstreamCluster
        switch side {
        case .outbound:
            var name = headers.first(name: "apus-upstream") ?? headers.first(name: ":authority") ?? headers.first(name: "host") ?? ""
            if let colon = name.lastIndex(of: ":"), !name.hasSuffix("]") { name = String(name[..<colon]) }
            authority = name
            guard !name.isEmpty else {
                respondError(status: 400, grpc: 3, message: "name the upstream in :authority or apus-upstream")
                return
            }
            guard let found = shared.directory.cluster(name) else {
                respondError(status: 503, grpc: 14, message: "too many upstreams")
                return
            }
            target = found
        case .inbound:
            guard let app = shared.app else {
                respondError(status: 503, grpc: 14, message: "no app behind this sidecar (--app-port)")
                return
            }
            authority = headers.first(name: ":authority") ?? "app"
            target = app
        }
        cluster = target
        phase = .resolving
        if target.isResolved {
            admit(target)
        } else {
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let loop = context.eventLoop
            target.whenResolved { resolved in
                loop.execute {
                    let proxy = bound.value
                    guard proxy.phase == .resolving else { return }
                    if resolved {
                        proxy.admit(target)
                    } else {
                        proxy.respondError(status: 503, grpc: 14, message: Refusal.registryUnavailable(target.name).message)
                    }
                }
            }
        }
    }

    private func admit(_ target: UpstreamCluster) {
        let now = SidecarClock.now()
        if side == .inbound {
            let caller = requestHeaders.first(name: "x-apus-caller") ?? peer
            switch shared.limits.admit(caller: caller, now: now) {
            case .admitted:
                admittedInbound = true
            case .overConcurrency(let limit):
                target.metrics.recordRequest(code: 503, nanoseconds: 0)
                respondError(status: 503, grpc: 8, message: "the app is serving \(limit) requests (inbound.max_concurrency): refused")
                return
            case .rateLimited(let caller, _):
                target.metrics.recordRequest(code: 429, nanoseconds: 0)
                respondError(status: 429, grpc: 8, message: "rate limit exceeded for caller \(caller)")
                return
            }
        }
        if let refusal = target.admit(now: now) {
            if admittedInbound {
                shared.limits.release()
                admittedInbound = false
            }
            respondError(status: 503, grpc: 14, message: refusal.message)
            return
        }
        admitted = true
        shared.inFlight.add(1, ordering: .relaxed)
        policy = target.policy
        var budgetNs = SidecarClock.nanos(policy.timeout)
        if let grpcTimeout = requestHeaders.first(name: "grpc-timeout"), let ns = Self.parseGRPCTimeout(grpcTimeout) {
            budgetNs = min(budgetNs, ns)
        }
        if let text = requestHeaders.first(name: "x-apus-deadline-ms"), let epochMs = Int(text) {
            let remaining = max(0, epochMs - EpochClock.nowMs())
            budgetNs = min(budgetNs, UInt64(remaining) * 1_000_000)
        }
        deadline = now + budgetNs
        retryable = policy.mayRetry(method: method, path: path, grpc: isGRPC)
        if let name = policy.hashHeader, policy.balance == .consistentHash { hashKey = requestHeaders.first(name: name) }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: .nanoseconds(Int64(budgetNs))) { bound.value.timedOut() }
        attempt()
    }

    /// `grpc-timeout`: up to 8 digits and a unit (H M S m u n).
    static func parseGRPCTimeout(_ value: String) -> UInt64? {
        guard let unit = value.last, value.count >= 2, value.count <= 9, let amount = UInt64(value.dropLast()) else { return nil }
        switch unit {
        case "H": return amount * 3_600_000_000_000
        case "M": return amount * 60_000_000_000
        case "S": return amount * 1_000_000_000
        case "m": return amount * 1_000_000
        case "u": return amount * 1_000
        case "n": return amount
        default: return nil
        }
    }

    /// The request headers for the endpoint: the caller's, with the remaining deadline, trace context and caller.
    private func upstreamHeaders() -> HPACKHeaders {
        var headers = HPACKHeaders()
        headers.reserveCapacity(requestHeaders.count + 4)
        let now = SidecarClock.now()
        let remainingMs = deadline > now ? (deadline - now) / 1_000_000 : 0
        for (name, value, indexable) in requestHeaders {
            switch name {
            case "grpc-timeout", "x-apus-deadline-ms", "apus-upstream":
                continue
            case "x-apus-caller" where side == .outbound:
                continue
            default:
                headers.add(name: name, value: value, indexing: indexable)
            }
        }
        // Values new on every request stay out of the HPACK dynamic table (they would only evict reusable ones).
        if isGRPC {
            headers.add(name: "grpc-timeout", value: "\(max(remainingMs, 1))m", indexing: .nonIndexable)
        }
        headers.add(name: "x-apus-deadline-ms", value: String(EpochClock.nowMs() + Int(remainingMs)), indexing: .nonIndexable)
        if side == .outbound {
            if !requestHeaders.contains(name: "traceparent") { headers.add(name: "traceparent", value: pools.ids.traceparent(), indexing: .nonIndexable) }
            if !requestHeaders.contains(name: "x-request-id") { headers.add(name: "x-request-id", value: requestID, indexing: .nonIndexable) }
            if let caller = shared.callerName { headers.add(name: "x-apus-caller", value: caller) }
        }
        return headers
    }

    // MARK: attempts

    private func attempt() {
        guard let cluster else { return }
        let now = SidecarClock.now()
        guard let chosen = cluster.pick(hashKey: hashKey, tried: tried, now: now) else {
            fail(status: 503, grpc: 14, message: cluster.noEndpointReason.message, outcome: .failure)
            return
        }
        attempts += 1
        tried.append(chosen.id)
        endpoint = chosen
        phase = .connecting
        let key = "\(chosen.address):\(chosen.port)"
        if isGRPC || chosen.protocol == "grpc" || chosen.protocol == "h2" {
            openHTTP2(chosen, key: key)
        } else {
            openHTTP1(chosen, key: key)
        }
    }

    private func openHTTP2(_ chosen: ServiceEndpoint, key: String) {
        let relay = UpstreamStreamRelay(proxy: self)
        let attemptNumber = attempts
        pools.http2.openStream(key: key, host: chosen.address, port: chosen.port, initializer: { stream in
            try stream.pipeline.syncOperations.addHandler(relay)
        }, completion: { [self] result in
            guard phase == .connecting, attempts == attemptNumber else {
                if case .success(let stream) = result { stream.close(promise: nil) }
                return
            }
            switch result {
            case .success(let stream):
                upstreamStream = stream
                self.relay = relay
                phase = .relaying
                let headers = upstreamHeaders()
                let frames = takeFramesForAttempt()
                stream.write(HTTP2Frame.FramePayload.headers(.init(headers: headers, endStream: requestEnded && frames.isEmpty)), promise: nil)
                for frame in frames { stream.write(frame, promise: nil) }
                stream.flush()
            case .failure(let error):
                var nothingSent = false
                if case .connectFailed = error { nothingSent = true }
                attemptFailed(reason: "\(error)", nothingSent: nothingSent, status: 503)
            }
        })
    }

    private func openHTTP1(_ chosen: ServiceEndpoint, key: String, reuseIdle: Bool = true) {
        if reuseIdle, let connection = pools.http1.idleConnection(key: key) {
            sendHTTP1(on: connection)
            return
        }
        let attemptNumber = attempts
        pools.http1.connect(key: key, host: chosen.address, port: chosen.port) { [self] result in
            guard phase == .connecting, attempts == attemptNumber else {
                if case .success(let connection) = result { pools.http1.release(connection) }
                return
            }
            switch result {
            case .success(let connection): sendHTTP1(on: connection)
            case .failure(let error): attemptFailed(reason: "connect to \(key) failed: \(describeConnectError(error))", nothingSent: true, status: 503)
            }
        }
    }

    /// The body frames a new attempt starts with: those not sent anywhere yet, or (a retry after something was
    /// sent, which needs a complete replay copy) the copy.
    private func takeFramesForAttempt() -> [HTTP2Frame.FramePayload] {
        let frames = anySent ? bodyFrames : pending
        pending = []
        anySent = true
        return frames
    }

    /// Re-frames the request as HTTP/1.1: head from the HPACK fields, DATA as the body (chunked without a length).
    private func sendHTTP1(on connection: HTTP1UpstreamConnection) {
        http1 = connection
        phase = .relaying
        connection.begin(sink: self, requestWasHEAD: method == "HEAD")
        var head = context.channel.allocator.buffer(capacity: 512)
        head.writeString(method)
        head.writeStatic(" ")
        head.writeString(path)
        head.writeStatic(" HTTP/1.1\r\nHost: ")
        head.writeString(requestHeaders.first(name: ":authority") ?? authority)
        head.writeStatic("\r\n")
        var hasLength = false
        for (name, value, _) in upstreamHeaders() {
            if name.hasPrefix(":") || name == "host" || name == "connection" || name == "te" || name == "transfer-encoding" { continue }
            if name == "content-length" { hasLength = true }
            head.writeString(name)
            head.writeStatic(": ")
            head.writeString(value)
            head.writeStatic("\r\n")
        }
        let frames = takeFramesForAttempt()
        let noBody = requestEnded && frames.allSatisfy { frame in
            if case .data(let data) = frame, case .byteBuffer(let b) = data.data { return b.readableBytes == 0 }
            return true
        }
        http1Chunked = !hasLength && !noBody
        if http1Chunked {
            head.writeStatic("Transfer-Encoding: chunked\r\n")
        } else if noBody && !hasLength && method != "GET" && method != "HEAD" {
            head.writeStatic("Content-Length: 0\r\n")
        }
        head.writeStatic("\r\n")
        connection.write(head, flush: false)
        for frame in frames { sendToUpstream(frame, flush: false) }
        if requestEnded, frames.isEmpty, http1Chunked { connection.write(ByteBuffer(string: "0\r\n\r\n"), flush: false) }
        connection.channel?.flush()
    }

    private func sendToUpstream(_ payload: HTTP2Frame.FramePayload, flush: Bool) {
        if let stream = upstreamStream {
            if flush { stream.writeAndFlush(payload, promise: nil) } else { stream.write(payload, promise: nil) }
            return
        }
        guard let connection = http1 else { return }
        switch payload {
        case .data(let data):
            guard case .byteBuffer(let bytes) = data.data else { return }
            if http1Chunked {
                if bytes.readableBytes > 0 {
                    var prefix = ByteBuffer(string: String(bytes.readableBytes, radix: 16))
                    prefix.writeStatic("\r\n")
                    connection.write(prefix, flush: false)
                    connection.write(bytes, flush: false)
                    connection.write(ByteBuffer(string: "\r\n"), flush: false)
                }
                if data.endStream { connection.write(ByteBuffer(string: "0\r\n\r\n"), flush: false) }
            } else if bytes.readableBytes > 0 {
                connection.write(bytes, flush: false)
            }
        case .headers(let trailers):
            if trailers.endStream, http1Chunked { connection.write(ByteBuffer(string: "0\r\n\r\n"), flush: false) }
        default:
            break
        }
        if flush { connection.channel?.flush() }
    }

    private func mayRetry(nothingSent: Bool) -> Bool {
        guard let cluster, !responseStarted, attempts < policy.attempts else { return false }
        // Another attempt needs the whole request: unsent, or a complete copy of what went out before.
        guard !anySent || (replayable && requestEnded) else { return false }
        guard nothingSent || retryable else { return false }
        let now = SidecarClock.now()
        guard now < deadline else { return false }
        return cluster.tryRetry(now: now)
    }

    private func attemptFailed(reason: String, nothingSent: Bool, status: Int) {
        guard let cluster else { return }
        if let endpoint { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
        dropAttempt()
        if mayRetry(nothingSent: nothingSent) {
            shared.logger.info("retrying", metadata: [
                "upstream": "\(cluster.name)", "requestID": "\(requestID)", "endpoint": "\(endpoint?.id ?? "")",
                "reason": "\(reason)", "attempt": "\(attempts + 1)",
            ])
            attempt()
            return
        }
        endpoint = nil
        fail(status: status, grpc: 14, message: "upstream \(cluster.name): \(reason)", outcome: .failure)
    }

    private func dropAttempt() {
        relay?.proxy = nil
        relay = nil
        upstreamStream?.close(promise: nil)
        upstreamStream = nil
        http1?.close()
        http1 = nil
        phase = .connecting
    }

    // MARK: HTTP/2 endpoint's answer (from UpstreamStreamRelay)

    func upstreamFrame(_ payload: HTTP2Frame.FramePayload) {
        guard phase == .relaying else { return }
        switch payload {
        case .headers(let headers):
            if !responseStarted {
                let statusText = headers.headers.first(name: ":status") ?? "200"
                let code = Int(statusText) ?? 0
                if (100..<200).contains(code) { return }
                let grpc = headers.headers.first(name: "grpc-status").flatMap { Int($0) }
                let retryableFailure = policy.retryOn.contains(code) || (isGRPC && headers.endStream && grpc == 14)
                if retryableFailure, mayRetry(nothingSent: false) {
                    if let endpoint, let cluster { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
                    shared.logger.info("retrying", metadata: [
                        "upstream": "\(cluster?.name ?? "")", "requestID": "\(requestID)", "endpoint": "\(endpoint?.id ?? "")",
                        "status": "\(code)", "grpcStatus": "\(grpc.map(String.init) ?? "")", "attempt": "\(attempts + 1)",
                    ])
                    dropAttempt()
                    attempt()
                    return
                }
                responseStarted = true
                status = code
                if let grpc { grpcStatus = grpc }
            } else if let grpc = headers.headers.first(name: "grpc-status").flatMap({ Int($0) }) {
                grpcStatus = grpc
            }
            let ends = headers.endStream
            context.write(wrapOutboundOut(payload), promise: nil)
            if ends { responseComplete() }
        case .data(let data):
            guard responseStarted else { return }
            context.write(wrapOutboundOut(payload), promise: nil)
            if data.endStream { responseComplete() }
        default:
            break
        }
    }

    func upstreamFlushed() {
        context.flush()
    }

    /// The endpoint's stream closed or reset.
    func upstreamClosed() {
        guard phase == .relaying, !responseEnded else { return }
        if !responseStarted {
            attemptFailed(reason: "endpoint reset the stream before answering", nothingSent: false, status: 502)
        } else {
            if let endpoint, let cluster { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
            endpoint = nil
            context.flush()
            endCall(outcome: .failure, code: 502)
            context.close(promise: nil)
        }
    }

    // MARK: HTTP/1.1 endpoint's answer

    func responseHead(_ head: ByteBuffer, status code: Int, closeDelimited: Bool) -> Bool {
        guard phase == .relaying else { return false }
        if policy.retryOn.contains(code), mayRetry(nothingSent: false) {
            if let endpoint, let cluster { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
            http1 = nil
            let attemptNumber = attempts
            context.eventLoop.execute { [self] in
                guard attempts == attemptNumber, phase == .relaying else { return }
                dropAttempt()
                attempt()
            }
            return false
        }
        responseStarted = true
        status = code
        var headers = HPACKHeaders()
        headers.add(name: ":status", value: String(code))
        head.withUnsafeReadableBytes { bytes in
            var lineEnd = 0
            while bytes[lineEnd] != HTTPBytes.lf { lineEnd += 1 }
            _ = HTTPBytes.forEachHeader(bytes, from: lineEnd + 1, headEnd: bytes.count + 2) { name, value, _ in
                let lowered = HTTPBytes.string(bytes, name).lowercased()
                switch lowered {
                case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade": break
                default: headers.add(name: lowered, value: HTTPBytes.string(bytes, value))
                }
                return true
            }
        }
        context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
        return true
    }

    func responseBody(_ bytes: ByteBuffer) {
        context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(bytes)))), promise: nil)
    }

    func responseFlush() {
        context.flush()
    }

    func responseComplete() {
        if let connection = http1 {
            http1 = nil
            if requestEnded { pools.http1.release(connection) } else { connection.close() }
            context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true))), promise: nil)
        } else {
            context.flush()
        }
        responseEnded = true
        let failed = policy.retryOn.contains(status) || (grpcStatus == 14)
        if let endpoint, let cluster { cluster.attemptEnded(endpoint.id, failed ? .failure : .success, now: SidecarClock.now()) }
        endpoint = nil
        relay?.proxy = nil
        relay = nil
        endCall(outcome: failed ? .failure : .success, code: metricCode())
    }

    func responseFailed(_ reason: String, beforeHead: Bool) {
        let stale = http1?.servedBefore == true
        http1 = nil
        if beforeHead, !responseStarted, stale, !staleRetried, requestEnded, replayable, let endpoint {
            // A pooled keep-alive connection the endpoint had closed: once more on a fresh connection.
            staleRetried = true
            phase = .connecting
            openHTTP1(endpoint, key: "\(endpoint.address):\(endpoint.port)", reuseIdle: false)
            return
        }
        if beforeHead, !responseStarted {
            attemptFailed(reason: reason, nothingSent: false, status: 502)
        } else {
            if let endpoint, let cluster { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
            endpoint = nil
            endCall(outcome: .failure, code: 502)
            context.close(promise: nil)
        }
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        // A slow endpoint slows the client: stop reading the request body while the endpoint cannot take more.
        context.channel.setOption(ChannelOptions.autoRead, value: writable).whenFailure { _ in }
    }

    // MARK: endings

    private func metricCode() -> Int {
        guard isGRPC, let grpcStatus else { return status }
        switch grpcStatus {
        case 0: return 200
        case 3: return 400
        case 4: return 504
        case 5: return 404
        case 7: return 403
        case 8: return 429
        case 12: return 501
        case 14: return 503
        case 16: return 401
        default: return 500
        }
    }

    private func timedOut() {
        guard phase != .finished, let cluster else { return }
        if let endpoint { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
        endpoint = nil
        let budget = (deadline - startedAt) / 1_000_000
        dropAttempt()
        if responseStarted {
            endCall(outcome: .failure, code: 504)
            context.close(promise: nil)
            return
        }
        fail(status: 504, grpc: 4, message: "upstream \(cluster.name) did not answer within \(budget) ms", outcome: .failure)
    }

    private func endCall(outcome: AttemptOutcome, code: Int) {
        guard phase != .finished else { return }
        phase = .finished
        timer?.cancel()
        timer = nil
        if let endpoint, let cluster { cluster.attemptEnded(endpoint.id, .abandoned, now: SidecarClock.now()) }
        endpoint = nil
        dropAttemptQuietly()
        if admitted, let cluster {
            cluster.requestEnded(outcome, code: code, startedAt: startedAt, now: SidecarClock.now())
            shared.inFlight.add(-1, ordering: .relaxed)
            admitted = false
        }
        if admittedInbound {
            shared.limits.release()
            admittedInbound = false
        }
    }

    private func dropAttemptQuietly() {
        relay?.proxy = nil
        relay = nil
        if !responseEnded { upstreamStream?.close(promise: nil) }
        upstreamStream = nil
        if let http1 {
            self.http1 = nil
            http1.close()
        }
    }

    private func fail(status: Int, grpc: Int, message: String, outcome: AttemptOutcome) {
        shared.logger.warning("request failed", metadata: [
            "upstream": "\(cluster?.name ?? "")", "requestID": "\(requestID)", "status": "\(status)", "reason": "\(message)",
        ])
        let code = isGRPC ? Self.httpCode(grpc: grpc) : status
        endCall(outcome: outcome, code: code)
        writeError(status: status, grpc: grpc, message: message)
    }

    static func httpCode(grpc: Int) -> Int {
        switch grpc {
        case 4: 504
        case 8: 429
        case 3: 400
        default: 503
        }
    }

    /// Refused before any endpoint was involved.
    private func respondError(status: Int, grpc: Int, message: String) {
        phase = .finished
        writeError(status: status, grpc: grpc, message: message)
    }

    private func writeError(status: Int, grpc: Int, message: String) {
        if isGRPC {
            var headers = HPACKHeaders()
            headers.add(name: ":status", value: "200")
            headers.add(name: "content-type", value: "application/grpc")
            headers.add(name: "grpc-status", value: String(grpc))
            headers.add(name: "grpc-message", value: Self.percentEncode(message))
            context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: headers, endStream: true))), promise: nil)
        } else {
            let body = errorBody(message, upstream: cluster?.name)
            var headers = HPACKHeaders()
            headers.add(name: ":status", value: String(status))
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "content-length", value: String(body.utf8.count))
            headers.add(name: "x-apus-sidecar", value: side == .outbound ? "outbound" : "inbound")
            context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer(string: body)), endStream: true))), promise: nil)
        }
    }

    /// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
    static func percentEncode(_ message: String) -> String {
        var out = ""
        for byte in message.utf8 {
            if byte >= 0x20 && byte <= 0x7E && byte != UInt8(ascii: "%") {
                out.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                out += "%" + String(byte, radix: 16, uppercase: true).leftPad(2)
            }
        }
        return out
    }
}

extension String {
    fileprivate func leftPad(_ width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// Handler on a stream to an HTTP/2 endpoint: hands its frames to the client's stream proxy.
final class UpstreamStreamRelay: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload

    weak var proxy: HTTP2StreamProxy?

    init(proxy: HTTP2StreamProxy) {
        self.proxy = proxy
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        proxy?.upstreamFrame(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        proxy?.upstreamFlushed()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        proxy?.upstreamWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        proxy?.upstreamClosed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
