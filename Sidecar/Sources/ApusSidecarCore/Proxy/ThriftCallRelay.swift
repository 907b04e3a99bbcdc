import ApusWire
import ApusMesh
import Logging
import NIOCore
import NIOPosix

/// The per-upstream Thrift listener (`upstreams.NAME.thrift_port`), call by call. Each message from the app is
/// delimited with the gateway's `ThriftFrameDecoder` (framed, unframed/buffered, THeader, TTHeader; binary or
/// compact), so every call is balanced, timed, retried and counted on its own like an HTTP request: it goes as
/// it arrived (same bytes, same framing) over a pooled connection to the chosen endpoint, whose reply comes back
/// unchanged. Calls on one connection are served in order. Failures become `TApplicationException` replies in
/// the caller's framing. Lives on its event loop.
final class ThriftCallRelay: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    final class Call {
        let frame: ThriftFrame
        let raw: ByteBuffer
        let startedAt: Nanos
        var deadline: Nanos = 0
        var attempts = 0
        var tried: [String] = []
        var endpoint: ServiceEndpoint?
        var connection: ThriftUpstreamConnection?
        var admitted = false
        var staleRetried = false
        var timer: Scheduled<Void>?

        init(frame: ThriftFrame, raw: ByteBuffer, startedAt: Nanos) {
            self.frame = frame
            self.raw = raw
            self.startedAt = startedAt
        }

        var isOneway: Bool { frame.envelope.type == .oneway }
    }

    static let maxFrameSize = 16 << 20

    private let cluster: UpstreamCluster
    private let shared: SidecarShared
    private var context: ChannelHandlerContext!
    private var pool: ThriftUpstreamPool!
    private var buffer: ByteBuffer?
    private var queue: [Call] = []
    private var current: Call?
    private var closed = false

    init(cluster: UpstreamCluster, shared: SidecarShared) {
        self.cluster = cluster
        self.shared = shared
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.pool = shared.resources(for: context.eventLoop).thrift
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffer == nil { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
        while var pending = buffer, pending.readableBytes > 0 {
            let before = pending  // the message's bytes as they arrived, framing included
            let frame: ThriftFrame?
            do throws(ThriftDecodingError) {
                frame = try ThriftFrameDecoder.nextFrame(&pending, maxFrameSize: Self.maxFrameSize, expected: nil)
            } catch {
                shared.logger.warning("thrift: undecodable message; closing", metadata: ["upstream": "\(cluster.name)", "reason": "\(error)"])
                context.close(promise: nil)
                return
            }
            guard let frame else { break }
            let raw = before.getSlice(at: before.readerIndex, length: pending.readerIndex - before.readerIndex)!
            buffer = pending.readableBytes == 0 ? nil : pending
            queue.append(Call(frame: frame, raw: raw, startedAt: SidecarClock.now()))
        }
        startNext()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        if let call = current {
            current = nil
            end(call, .abandoned)
        }
        queue = []
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    // MARK: calls

    private func startNext() {
        while current == nil, !closed, !queue.isEmpty {
            let call = queue.removeFirst()
            let now = SidecarClock.now()
            if let refusal = cluster.admit(now: now) {
                replyError(call, refusal.message)
                continue
            }
            call.admitted = true
            shared.inFlight.add(1, ordering: .relaxed)
            call.deadline = now + SidecarClock.nanos(cluster.policy.timeout)
            current = call
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            call.timer = context.eventLoop.scheduleTask(deadline: NIODeadline.uptimeNanoseconds(call.deadline)) { bound.value.timedOut(call) }
            attempt(call)
        }
    }

    private func attempt(_ call: Call) {
        guard let endpoint = cluster.pick(hashKey: nil, tried: call.tried, now: SidecarClock.now()) else {
            fail(call, cluster.noEndpointReason.message)
            return
        }
        call.attempts += 1
        call.tried.append(endpoint.id)
        call.endpoint = endpoint
        connect(call, to: endpoint, reuseIdle: true)
    }

    private func connect(_ call: Call, to endpoint: ServiceEndpoint, reuseIdle: Bool) {
        let key = "\(endpoint.address):\(endpoint.port)/\(call.frame.transport.rawValue)"
        if reuseIdle, let connection = pool.idle(key: key) {
            send(call, on: connection)
            return
        }
        pool.connect(key: key, host: endpoint.address, port: endpoint.port) { [self] result in
            guard current === call else {
                if case .success(let connection) = result { pool.release(connection) }
                return
            }
            switch result {
            case .success(let connection): send(call, on: connection)
            case .failure(let error): attemptFailed(call, "connect to \(endpoint.address):\(endpoint.port) failed: \(describeConnectError(error))", nothingSent: true)
            }
        }
    }

    private func send(_ call: Call, on connection: ThriftUpstreamConnection) {
        call.connection = connection
        if call.isOneway {
            connection.sendOneway(call.raw)
            finish(call)
            return
        }
        connection.send(call.raw, expecting: call.frame.transport, relay: self)
    }

    private func mayRetry(_ call: Call, nothingSent: Bool) -> Bool {
        let policy = cluster.policy
        guard call.attempts < policy.attempts else { return false }
        guard nothingSent || policy.mayRetry(method: "CALL", path: call.frame.envelope.name, grpc: true) else { return false }
        let now = SidecarClock.now()
        return now < call.deadline && cluster.tryRetry(now: now)
    }

    private func attemptFailed(_ call: Call, _ reason: String, nothingSent: Bool) {
        if let endpoint = call.endpoint { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
        call.connection = nil
        if mayRetry(call, nothingSent: nothingSent) {
            shared.logger.info("retrying", metadata: [
                "upstream": "\(cluster.name)", "method": "\(call.frame.envelope.name)", "endpoint": "\(call.endpoint?.id ?? "")",
                "reason": "\(reason)", "attempt": "\(call.attempts + 1)",
            ])
            attempt(call)
            return
        }
        call.endpoint = nil
        fail(call, "upstream \(cluster.name): \(reason)")
    }

    // MARK: from the endpoint connection

    func reply(_ bytes: ByteBuffer, from connection: ThriftUpstreamConnection) {
        guard let call = current, call.connection === connection else { return }
        context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
        pool.release(connection)
        call.connection = nil
        finish(call)
    }

    func connectionFailed(_ connection: ThriftUpstreamConnection, servedBefore: Bool) {
        guard let call = current, call.connection === connection else { return }
        if servedBefore, !call.staleRetried, let endpoint = call.endpoint {
            // A pooled connection the endpoint had closed meanwhile: once more on a fresh one.
            call.staleRetried = true
            call.connection = nil
            connect(call, to: endpoint, reuseIdle: false)
            return
        }
        attemptFailed(call, "endpoint closed the connection before replying", nothingSent: false)
    }

    // MARK: endings

    private func timedOut(_ call: Call) {
        guard current === call else { return }
        call.connection?.close()
        call.connection = nil
        if let endpoint = call.endpoint { cluster.attemptEnded(endpoint.id, .failure, now: SidecarClock.now()) }
        call.endpoint = nil
        let budget = (call.deadline - call.startedAt) / 1_000_000
        fail(call, "upstream \(cluster.name) did not reply within \(budget) ms")
    }

    private func finish(_ call: Call) {
        if let endpoint = call.endpoint { cluster.attemptEnded(endpoint.id, .success, now: SidecarClock.now()) }
        call.endpoint = nil
        current = nil
        end(call, .success)
        startNext()
    }

    private func fail(_ call: Call, _ message: String) {
        shared.logger.warning("thrift call failed", metadata: [
            "upstream": "\(cluster.name)", "method": "\(call.frame.envelope.name)", "reason": "\(message)",
        ])
        current = nil
        end(call, .failure)
        replyError(call, message)
        startNext()
    }

    private func end(_ call: Call, _ outcome: AttemptOutcome) {
        call.timer?.cancel()
        call.timer = nil
        call.connection?.close()
        call.connection = nil
        if let endpoint = call.endpoint { cluster.attemptEnded(endpoint.id, .abandoned, now: SidecarClock.now()) }
        call.endpoint = nil
        guard call.admitted else { return }
        call.admitted = false
        cluster.requestEnded(outcome, code: outcome == .success ? 200 : 503, startedAt: call.startedAt, now: SidecarClock.now())
        shared.inFlight.add(-1, ordering: .relaxed)
    }

    /// A `TApplicationException` (INTERNAL_ERROR) in the caller's framing; a oneway call gets nothing.
    private func replyError(_ call: Call, _ message: String) {
        guard !call.isOneway, !closed else { return }
        let envelope = call.frame.envelope
        let exception = ThriftWire.applicationException(
            name: envelope.methodName, seqid: envelope.seqid, encoding: envelope.encoding, oldBinary: envelope.oldBinary,
            error: .internalError, message: message)
        let framed = ThriftFraming.encode(exception, transport: call.frame.transport, encoding: envelope.encoding,
                                          headerSeqid: call.frame.headerSeqid, allocator: context.channel.allocator)
        context.writeAndFlush(wrapOutboundOut(framed), promise: nil)
    }
}

/// One connection to a Thrift endpoint, one call at a time; reads the reply in the call's transport.
final class ThriftUpstreamConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    let key: String
    private(set) var channel: (any Channel)?
    private var buffer: ByteBuffer?
    private var expecting: ThriftTransport?
    private weak var relay: ThriftCallRelay?
    weak var idleIn: ThriftUpstreamPool?
    private(set) var servedBefore = false

    init(key: String) {
        self.key = key
    }

    var isActive: Bool { channel?.isActive ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
    }

    func send(_ bytes: ByteBuffer, expecting transport: ThriftTransport, relay: ThriftCallRelay) {
        self.relay = relay
        expecting = transport
        idleIn = nil
        channel?.writeAndFlush(bytes, promise: nil)
    }

    func sendOneway(_ bytes: ByteBuffer) {
        channel?.writeAndFlush(bytes, promise: nil)
    }

    func close() {
        relay = nil
        expecting = nil
        channel?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        guard let transport = expecting else {
            context.close(promise: nil)  // bytes nobody asked for
            return
        }
        if buffer == nil { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
        var pending = buffer!
        let before = pending
        let frame: ThriftFrame?
        do throws(ThriftDecodingError) {
            frame = try ThriftFrameDecoder.nextFrame(&pending, maxFrameSize: ThriftCallRelay.maxFrameSize, expected: transport)
        } catch {
            let relay = self.relay
            self.relay = nil
            expecting = nil
            context.close(promise: nil)
            relay?.connectionFailed(self, servedBefore: false)
            return
        }
        guard frame != nil else { return }
        let reply = before.getSlice(at: before.readerIndex, length: pending.readerIndex - before.readerIndex)!
        buffer = nil
        expecting = nil
        servedBefore = true
        let relay = self.relay
        self.relay = nil
        relay?.reply(reply, from: self)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if expecting != nil {
            let relay = self.relay
            self.relay = nil
            expecting = nil
            relay?.connectionFailed(self, servedBefore: servedBefore && (buffer?.readableBytes ?? 0) == 0)
        }
        idleIn?.forget(self)
        idleIn = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Idle connections to Thrift endpoints, per event loop, keyed by `address:port/transport`.
final class ThriftUpstreamPool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private var idle: [String: [ThriftUpstreamConnection]] = [:]
    static let maxIdlePerEndpoint = 64

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func idle(key: String) -> ThriftUpstreamConnection? {
        while let connection = idle[key]?.popLast() {
            connection.idleIn = nil
            if connection.isActive { return connection }
        }
        return nil
    }

    func connect(key: String, host: String, port: Int, _ completion: @escaping (Result<ThriftUpstreamConnection, any Error>) -> Void) {
        let connection = ThriftUpstreamConnection(key: key)
        let bound = NIOLoopBound(connection, eventLoop: eventLoop)
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(HTTP1UpstreamPool.connectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(bound.value) }
            }
            .connect(host: host, port: port)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success: completion(.success(connection))
                case .failure(let error): completion(.failure(error))
                }
            }
    }

    func release(_ connection: ThriftUpstreamConnection) {
        guard connection.isActive, (idle[connection.key]?.count ?? 0) < Self.maxIdlePerEndpoint else {
            connection.close()
            return
        }
        connection.idleIn = self
        idle[connection.key, default: []].append(connection)
    }

    func forget(_ connection: ThriftUpstreamConnection) {
        idle[connection.key]?.removeAll { $0 === connection }
    }
}
