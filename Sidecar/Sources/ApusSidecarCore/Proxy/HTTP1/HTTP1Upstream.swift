import ApusGateway
import NIOCore
import NIOPosix

/// The side of an exchange that receives an endpoint's HTTP/1.1 response.
protocol HTTP1ResponseSink: AnyObject {
    /// The body as payload only (chunked framing removed), for a sink that re-frames it (HTTP/2).
    var wantsDecodedBody: Bool { get }
    /// The response head: status line and kept header lines (no blank line). Returns false to discard the
    /// response (it will be retried): the connection is then closed.
    func responseHead(_ head: ByteBuffer, status: Int, closeDelimited: Bool) -> Bool
    func responseBody(_ bytes: ByteBuffer)
    func responseFlush()
    func responseComplete()
    /// The connection failed before the response was complete (`beforeHead`: nothing was received).
    func responseFailed(_ reason: String, beforeHead: Bool)
    func upstreamWritabilityChanged(_ writable: Bool)
}

/// One keep-alive HTTP/1.1 connection to an endpoint; lives on one event loop.
final class HTTP1UpstreamConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State {
        case idle
        case head(requestWasHEAD: Bool)
        case body(BodyFraming, reusable: Bool)
        case discarded
    }

    let key: String
    private(set) var channel: (any Channel)?
    private var state = State.idle
    private var buffer: ByteBuffer?
    weak var sink: (any HTTP1ResponseSink)?
    weak var idleIn: HTTP1UpstreamPool?
    /// It already served a request: a failure before the head on reuse is a stale keep-alive, safe to retry.
    private(set) var servedBefore = false
    private static let maxHead = 64 << 10

    init(key: String) {
        self.key = key
    }

    var isActive: Bool { channel?.isActive ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
    }

    func begin(sink: any HTTP1ResponseSink, requestWasHEAD: Bool) {
        self.sink = sink
        state = .head(requestWasHEAD: requestWasHEAD)
        idleIn = nil
        setAutoRead(true)
    }

    func write(_ bytes: ByteBuffer, flush: Bool) {
        guard let channel else { return }
        if flush { channel.writeAndFlush(bytes, promise: nil) } else { channel.write(bytes, promise: nil) }
    }

    private var autoRead = true

    func setAutoRead(_ on: Bool) {
        guard on != autoRead else { return }
        autoRead = on
        channel?.setOption(ChannelOptions.autoRead, value: on).whenFailure { _ in }
    }

    /// Drops the connection (the exchange is abandoned; nothing more is reported).
    func close() {
        sink = nil
        state = .discarded
        channel?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        switch state {
        case .idle, .discarded:
            context.close(promise: nil)
        case .head(let wasHEAD):
            if buffer == nil { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
            parseHead(context: context, requestWasHEAD: wasHEAD)
        case .body:
            forwardBody(context: context, &incoming)
        }
    }

    private func parseHead(context: ChannelHandlerContext, requestWasHEAD: Bool) {
        guard var pending = buffer else { return }
        let parsed: (ResponseHead, Int)?? = pending.withUnsafeReadableBytes { bytes in
            guard let end = HTTPBytes.endOfHead(bytes) else { return .some(nil) }
            guard let head = ResponseHead.parse(bytes, headEnd: end, requestWasHEAD: requestWasHEAD) else { return nil }
            return (head, end)
        }
        guard let parsed else {
            fail(context: context, "endpoint sent a malformed response head", beforeHead: true)
            return
        }
        guard let (head, end) = parsed else {
            if pending.readableBytes > Self.maxHead { fail(context: context, "endpoint response head exceeds 64 KiB", beforeHead: true) }
            return
        }
        var out = context.channel.allocator.buffer(capacity: end + 160)
        pending.withUnsafeReadableBytes { bytes in head.keptSpans.write(from: bytes, to: &out) }
        pending.moveReaderIndex(forwardBy: end)
        buffer = nil
        if (100..<200).contains(head.status) {
            // Interim response (100 Continue): the final one follows.
            if pending.readableBytes > 0 {
                buffer = pending
                parseHead(context: context, requestWasHEAD: requestWasHEAD)
            }
            return
        }
        var closeDelimited = false
        if case .untilClose = head.framing { closeDelimited = true }
        guard let sink, sink.responseHead(out, status: head.status, closeDelimited: closeDelimited) else {
            // Discarded for a retry: this connection is out of step now.
            self.sink = nil
            state = .discarded
            context.close(promise: nil)
            return
        }
        state = .body(head.framing, reusable: !head.connectionClose)
        forwardBody(context: context, &pending)
    }

    private func forwardBody(context: ChannelHandlerContext, _ incoming: inout ByteBuffer) {
        guard case .body(let framing, let reusable) = state else { return }
        switch framing {
        case .none:
            finish(context: context, reusable: reusable && incoming.readableBytes == 0)
        case .length(let remaining):
            let take = min(remaining, incoming.readableBytes)
            if take > 0 { sink?.responseBody(incoming.readSlice(length: take)!) }
            if remaining == take {
                finish(context: context, reusable: reusable && incoming.readableBytes == 0)
            } else {
                state = .body(.length(remaining: remaining - take), reusable: reusable)
            }
        case .chunked(var scanner):
            let consumed: Int
            let decoded = sink?.wantsDecodedBody ?? false
            var payload: [Range<Int>] = []
            do {
                consumed = try incoming.withUnsafeReadableBytes { bytes throws(ChunkedBodyScanner.ScanError) in
                    try scanner.scan(bytes) { range in if decoded, !range.isEmpty { payload.append(range) } }
                }
            } catch {
                fail(context: context, "endpoint sent a malformed chunked body", beforeHead: false)
                return
            }
            if decoded {
                for range in payload {
                    sink?.responseBody(incoming.getSlice(at: incoming.readerIndex + range.lowerBound, length: range.count)!)
                }
                incoming.moveReaderIndex(forwardBy: consumed)
            } else if consumed > 0 {
                sink?.responseBody(incoming.readSlice(length: consumed)!)
            }
            if scanner.isDone {
                finish(context: context, reusable: reusable && incoming.readableBytes == 0)
            } else {
                state = .body(.chunked(scanner), reusable: reusable)
            }
        case .untilClose:
            if incoming.readableBytes > 0 { sink?.responseBody(incoming) }
        }
    }

    private func finish(context: ChannelHandlerContext, reusable: Bool) {
        state = reusable ? .idle : .discarded
        servedBefore = true
        let sink = self.sink
        self.sink = nil
        if !reusable { context.close(promise: nil) }
        sink?.responseComplete()
    }

    private func fail(context: ChannelHandlerContext, _ reason: String, beforeHead: Bool) {
        let sink = self.sink
        self.sink = nil
        state = .discarded
        context.close(promise: nil)
        sink?.responseFailed(reason, beforeHead: beforeHead)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        sink?.responseFlush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        sink?.upstreamWritabilityChanged(context.channel.isWritable)
    }

    func channelInactive(context: ChannelHandlerContext) {
        switch state {
        case .body(.untilClose, _):
            finish(context: context, reusable: false)
        case .head:
            let sink = self.sink
            self.sink = nil
            state = .discarded
            sink?.responseFailed("endpoint closed the connection before answering", beforeHead: true)
        case .body:
            let sink = self.sink
            self.sink = nil
            state = .discarded
            sink?.responseFailed("endpoint closed the connection mid-response", beforeHead: false)
        case .idle, .discarded:
            break
        }
        idleIn?.forget(self)
        idleIn = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Idle keep-alive connections to endpoints, per event loop, keyed by `address:port`.
final class HTTP1UpstreamPool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private var idle: [String: [HTTP1UpstreamConnection]] = [:]
    static let maxIdlePerEndpoint = 128
    static let connectTimeout = TimeAmount.seconds(1)

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func idleConnection(key: String) -> HTTP1UpstreamConnection? {
        while let connection = idle[key]?.popLast() {
            connection.idleIn = nil
            if connection.isActive { return connection }
        }
        return nil
    }

    func connect(key: String, host: String, port: Int, _ completion: @escaping (Result<HTTP1UpstreamConnection, any Error>) -> Void) {
        let connection = HTTP1UpstreamConnection(key: key)
        let bound = NIOLoopBound(connection, eventLoop: eventLoop)
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(Self.connectTimeout)
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

    func release(_ connection: HTTP1UpstreamConnection) {
        guard connection.isActive else { return }
        guard (idle[connection.key]?.count ?? 0) < Self.maxIdlePerEndpoint else {
            connection.close()
            return
        }
        connection.idleIn = self
        idle[connection.key, default: []].append(connection)
    }

    func forget(_ connection: HTTP1UpstreamConnection) {
        idle[connection.key]?.removeAll { $0 === connection }
    }

    func closeAll() {
        let all = idle.values.flatMap { $0 }
        idle.removeAll()
        for connection in all {
            connection.idleIn = nil
            connection.close()
        }
    }
}
