import ApusCore
import ApusWire
import NIOCore
import NIOPosix

/// The side of an exchange that receives an instance's response (the client connection).
protocol UpstreamExchange: AnyObject {
    /// The response head is complete: status line and kept headers (no blank line), and whether the body ends
    /// only when the instance closes the connection.
    /// Appends its own header lines and the blank line to `head` and writes it.
    func upstreamHead(_ head: inout ByteBuffer, status: Int, closeDelimited: Bool)
    func upstreamBody(_ bytes: ByteBuffer)
    func upstreamFlush()
    /// The response is complete. `reusable` says whether the connection may serve another request.
    func upstreamComplete(reusable: Bool)
    /// The connection failed before the response was complete.
    func upstreamFailed(_ reason: String)
    func upstreamWritabilityChanged(_ writable: Bool)
}

/// One keep-alive HTTP/1.1 connection to an instance, reading responses with the minimal codec.
/// Lives on one event loop; all calls happen there.
final class UpstreamConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let endpoint: InstanceEndpoint
    /// The instance this connection belongs to; ports can be reused by a later instance.
    let instanceID: String
    private(set) var channel: (any Channel)?
    private var reader = ResponseReader()
    /// An incomplete response head, until the rest arrives.
    private var buffer: ByteBuffer?
    private var headScratch: ByteBuffer?
    weak var exchange: (any UpstreamExchange)?
    /// The pool holding this connection while it is idle; told when an idle connection closes.
    weak var idleIn: UpstreamPool?
    /// Whether this connection already served a request (a failure on reuse may be retried).
    private(set) var servedBefore = false

    init(instanceID: String, endpoint: InstanceEndpoint) {
        self.instanceID = instanceID
        self.endpoint = endpoint
    }

    var isActive: Bool { channel?.isActive ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
    }

    /// Starts an exchange: the caller then writes the request head and body to `channel`.
    func begin(exchange: any UpstreamExchange, requestWasHEAD: Bool) {
        self.exchange = exchange
        reader.begin(requestWasHEAD: requestWasHEAD)
        idleIn = nil
        setAutoRead(true)  // a previous exchange may have paused reading for a slow client
    }

    func write(_ bytes: ByteBuffer, flush: Bool) {
        guard let channel else { return }
        if flush {
            channel.writeAndFlush(bytes, promise: nil)
        } else {
            channel.write(bytes, promise: nil)
        }
    }

    private var autoRead = true

    func setAutoRead(_ on: Bool) {
        guard on != autoRead else { return }
        autoRead = on
        _ = channel?.setOption(ChannelOptions.autoRead, value: on)
    }

    func close() {
        exchange = nil
        reader.reset()
        channel?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if var pending = buffer {
            buffer = nil
            pending.writeBuffer(&incoming)
            incoming = pending
        }
        while true {
            switch incoming.withUnsafeReadableBytes({ reader.next($0) }) {
            case .needMore:
                // Only an incomplete head is left unread (body bytes are all passed on as they come).
                if incoming.readableBytes > 0 { buffer = incoming }
                return
            case .interim(let head, let length):
                // Interim response: pass it on and wait for the final one.
                var out = headBuffer(head, in: incoming, context: context)
                out.writeStatic("\r\n")
                exchange?.upstreamBody(out)
                incoming.moveReaderIndex(forwardBy: length)
            case .head(let head, let length):
                var out = headBuffer(head, in: incoming, context: context)
                if case .untilClose = head.framing {
                    exchange?.upstreamHead(&out, status: head.status, closeDelimited: true)
                } else {
                    exchange?.upstreamHead(&out, status: head.status, closeDelimited: false)
                }
                // Reused for the next head once the client connection has written it.
                headScratch = out
                incoming.moveReaderIndex(forwardBy: length)
            case .body(let count):
                exchange?.upstreamBody(incoming.readSlice(length: count)!)
            case .complete(let reusable):
                finish(context: context, reusable: reusable)
                return
            case .failed(let failure):
                fail(context: context, failure.message(from: "instance"))
                return
            case .unexpectedBytes:
                // Bytes nobody asked for: the connection is out of step, drop it.
                context.close(promise: nil)
                return
            }
        }
    }

    /// The head's status line and kept header lines, in the previous head's storage when it is free.
    private func headBuffer(_ head: ResponseHead, in incoming: ByteBuffer, context: ChannelHandlerContext) -> ByteBuffer {
        var out = headScratch ?? context.channel.allocator.buffer(capacity: 256)
        headScratch = nil
        out.clear()
        incoming.withUnsafeReadableBytes { bytes in
            head.keptSpans.forEach { span in out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[span])) }
        }
        return out
    }

    private func finish(context: ChannelHandlerContext, reusable: Bool) {
        servedBefore = true
        buffer = nil
        let exchange = self.exchange
        self.exchange = nil
        exchange?.upstreamComplete(reusable: reusable && context.channel.isActive)
        if !reusable { context.close(promise: nil) }
    }

    private func fail(context: ChannelHandlerContext, _ reason: String) {
        let exchange = self.exchange
        self.exchange = nil
        reader.reset()
        buffer = nil
        context.close(promise: nil)
        exchange?.upstreamFailed(reason)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.upstreamFlush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.upstreamWritabilityChanged(context.channel.isWritable)
    }

    func channelInactive(context: ChannelHandlerContext) {
        switch reader.upstreamClosed() {
        case .complete:
            finish(context: context, reusable: false)
        case .idle:
            break
        case .beforeHead, .midBody:
            let exchange = self.exchange
            self.exchange = nil
            exchange?.upstreamFailed("instance closed the connection before answering")
        }
        idleIn?.forget(self)
        idleIn = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Idle keep-alive connections to instances, per event loop and instance. Every method runs on `eventLoop`
/// (asserted), which is what makes sharing the reference across threads safe.
final class UpstreamPool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private var idle: [String: [UpstreamConnection]] = [:]
    static let maxIdlePerInstance = 256

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    /// An idle kept-alive connection to the instance, if there is one.
    func idleConnection(instanceID: String) -> UpstreamConnection? {
        eventLoop.assertInEventLoop()
        // Empty lists stay in place (keeping their capacity) while the instance lives: no allocation per request.
        while let connection = idle[instanceID]?.popLast() {
            connection.idleIn = nil
            if connection.isActive { return connection }
        }
        return nil
    }

    /// A new connection to the instance, reported once connected.
    func connect(instanceID: String, endpoint: InstanceEndpoint, _ completion: @escaping (Result<UpstreamConnection, any Error>) -> Void) {
        eventLoop.assertInEventLoop()
        let connection = UpstreamConnection(instanceID: instanceID, endpoint: endpoint)
        let bound = NIOLoopBound(connection, eventLoop: eventLoop)
        let future = connectToInstance(endpoint: endpoint, on: eventLoop) { channel in
            try channel.pipeline.syncOperations.addHandler(bound.value)
        }
        future.assumeIsolated().whenComplete { result in
            switch result {
            case .success: completion(.success(connection))
            case .failure(let error): completion(.failure(error))
            }
        }
    }

    /// Keeps a connection for the next request to the same instance.
    func release(_ connection: UpstreamConnection) {
        eventLoop.assertInEventLoop()
        guard connection.isActive else { return }
        guard (idle[connection.instanceID]?.count ?? 0) < Self.maxIdlePerInstance else {
            connection.close()
            return
        }
        connection.idleIn = self
        idle[connection.instanceID, default: []].append(connection)
    }

    /// Drops an idle connection that closed.
    func forget(_ connection: UpstreamConnection) {
        idle[connection.instanceID]?.removeAll { $0 === connection }
        if idle[connection.instanceID]?.isEmpty == true { idle[connection.instanceID] = nil }
    }

    func closeAll() {
        eventLoop.assertInEventLoop()
        let all = idle.values.flatMap { $0 }
        idle.removeAll()
        for connection in all {
            connection.idleIn = nil
            connection.close()
        }
    }
}
