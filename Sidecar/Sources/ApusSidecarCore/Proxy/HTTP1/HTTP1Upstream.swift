import ApusWire
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

    let key: String
    private(set) var channel: (any Channel)?
    private var reader = ResponseReader()
    /// Given up (closed, or its response discarded for a retry): nothing it receives is read any more.
    private var discarded = false
    /// An incomplete response head, until the rest arrives.
    private var buffer: ByteBuffer?
    weak var sink: (any HTTP1ResponseSink)?
    weak var idleIn: HTTP1UpstreamPool?
    /// It already served a request: a failure before the head on reuse is a stale keep-alive, safe to retry.
    private(set) var servedBefore = false

    init(key: String) {
        self.key = key
    }

    var isActive: Bool { channel?.isActive ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
    }

    func begin(sink: any HTTP1ResponseSink, requestWasHEAD: Bool) {
        self.sink = sink
        reader.begin(requestWasHEAD: requestWasHEAD)
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
        discard()
        channel?.close(promise: nil)
    }

    private func discard() {
        discarded = true
        reader.reset()
        buffer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !discarded else {
            context.close(promise: nil)
            return
        }
        var incoming = unwrapInboundIn(data)
        if var pending = buffer {
            buffer = nil
            pending.writeBuffer(&incoming)
            incoming = pending
        }
        let decoded = sink?.wantsDecodedBody ?? false
        var payload: [Range<Int>] = []
        while true {
            payload.removeAll(keepingCapacity: true)
            let event = incoming.withUnsafeReadableBytes { bytes in
                decoded ? reader.next(bytes) { range in if !range.isEmpty { payload.append(range) } } : reader.next(bytes)
            }
            switch event {
            case .needMore:
                // Only an incomplete head is left unread (body bytes are all passed on as they come).
                if incoming.readableBytes > 0 { buffer = incoming }
                return
            case .interim(_, let length):
                // Interim response (100 Continue): the final one follows.
                incoming.moveReaderIndex(forwardBy: length)
            case .head(let head, let length):
                var out = context.channel.allocator.buffer(capacity: length + 160)
                incoming.withUnsafeReadableBytes { bytes in head.keptSpans.write(from: bytes, to: &out) }
                incoming.moveReaderIndex(forwardBy: length)
                var closeDelimited = false
                if case .untilClose = head.framing { closeDelimited = true }
                guard let sink, sink.responseHead(out, status: head.status, closeDelimited: closeDelimited) else {
                    // Discarded for a retry: this connection is out of step now.
                    self.sink = nil
                    discard()
                    context.close(promise: nil)
                    return
                }
            case .body(let count):
                if decoded {
                    for range in payload {
                        sink?.responseBody(incoming.getSlice(at: incoming.readerIndex + range.lowerBound, length: range.count)!)
                    }
                    incoming.moveReaderIndex(forwardBy: count)
                } else {
                    sink?.responseBody(incoming.readSlice(length: count)!)
                }
            case .complete(let reusable):
                finish(context: context, reusable: reusable)
                return
            case .failed(let failure):
                fail(context: context, failure.message(from: "endpoint"), beforeHead: failure != .malformedChunkedBody)
                return
            case .unexpectedBytes:
                context.close(promise: nil)
                return
            }
        }
    }

    private func finish(context: ChannelHandlerContext, reusable: Bool) {
        if !reusable { discard() }
        servedBefore = true
        let sink = self.sink
        self.sink = nil
        if !reusable { context.close(promise: nil) }
        sink?.responseComplete()
    }

    private func fail(context: ChannelHandlerContext, _ reason: String, beforeHead: Bool) {
        let sink = self.sink
        self.sink = nil
        discard()
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
        let closed = discarded ? .idle : reader.upstreamClosed()
        switch closed {
        case .complete:
            finish(context: context, reusable: false)
        case .beforeHead:
            let sink = self.sink
            self.sink = nil
            discard()
            sink?.responseFailed("endpoint closed the connection before answering", beforeHead: true)
        case .midBody:
            let sink = self.sink
            self.sink = nil
            discard()
            sink?.responseFailed("endpoint closed the connection mid-response", beforeHead: false)
        case .idle:
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
