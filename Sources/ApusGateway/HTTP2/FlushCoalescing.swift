import NIOCore
import NIOHTTP2

/// A connection whose flush can wait for the end of the current read burst.
protocol DeferrableFlush: AnyObject {
    func flushDeferred()
}

/// Flushes held back while a read burst is handled, one per event loop, so that a connection is flushed (one
/// `writev`) once per burst rather than once per call. A read from an instance can carry responses for many
/// calls, each flushing its client stream (NIO turns every stream flush into a flush of the client connection);
/// a read from a client can carry requests for many calls, each flushing the instance connection. While either
/// kind of burst is handled, those flushes are noted here and done when it ends. Lives on its event loop.
final class DeferredFlushes {
    private var depth = 0
    private var waiting: [any DeferrableFlush] = []

    /// A read burst starts: flushes wait until it ends.
    func begin() {
        depth += 1
    }

    /// The burst ends: every connection that asked for a flush meanwhile gets one.
    func end() {
        guard depth > 0 else {
            assertionFailure("DeferredFlushes.end() without begin()")
            return
        }
        depth -= 1
        guard depth == 0 else { return }
        while !waiting.isEmpty {
            let connections = waiting
            waiting.removeAll(keepingCapacity: true)
            for connection in connections { connection.flushDeferred() }
        }
    }

    /// True when the flush is deferred: `connection.flushDeferred()` follows at the end of the burst.
    func deferFlush(_ connection: any DeferrableFlush) -> Bool {
        guard depth > 0 else { return false }
        waiting.append(connection)
        return true
    }
}

/// Sits in front of `NIOHTTP2Handler` on a client connection (towards the socket). Its reads are a burst for
/// `DeferredFlushes` (the calls' flushes of instance connections wait for its end), and its own flushes wait
/// while an instance's read burst is handled. Data passes untouched.
final class EdgeFlushCoalescer: ChannelDuplexHandler, DeferrableFlush {
    typealias InboundIn = Any
    typealias OutboundIn = Any

    private let deferred: DeferredFlushes
    private var context: ChannelHandlerContext?
    private var isWaiting = false
    private var inBurst = false

    init(_ deferred: DeferredFlushes) {
        self.deferred = deferred
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        endBurst()
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if !inBurst {
            inBurst = true
            deferred.begin()
        }
        context.fireChannelRead(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.fireChannelReadComplete()
        endBurst()
    }

    func channelInactive(context: ChannelHandlerContext) {
        context.fireChannelInactive()
        endBurst()
    }

    func flush(context: ChannelHandlerContext) {
        if isWaiting { return }
        if deferred.deferFlush(self) {
            isWaiting = true
        } else {
            context.flush()
        }
    }

    func flushDeferred() {
        isWaiting = false
        context?.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        // What waits for a flush (a GOAWAY before closing after a connection error) goes out first.
        if isWaiting {
            isWaiting = false
            context.flush()
        }
        context.close(mode: mode, promise: promise)
    }

    private func endBurst() {
        guard inBurst else { return }
        inBurst = false
        deferred.end()
    }
}

/// Whether a connection has writes to flush, and whether its flush already waits for the end of a read burst.
struct PendingFlush {
    var needed = false
    var waiting = false
}

/// A connection handler whose writes leave once per read burst: a write sets `pendingFlush.needed`, `flush()`
/// flushes now or, inside a burst, once the burst ends (`DeferredFlushes`). The frame-level HTTP/2 handlers on
/// both sides of a gRPC call use it.
protocol BurstFlushing: DeferrableFlush {
    var pendingFlush: PendingFlush { get set }
    var flushContext: ChannelHandlerContext? { get }
    var deferredFlushes: DeferredFlushes? { get }
}

extension BurstFlushing {
    /// Flushes what was written since the last flush; inside a read burst (of this connection or the other side's),
    /// at its end.
    func flush() {
        guard pendingFlush.needed, !pendingFlush.waiting, let context = flushContext else { return }
        if let deferredFlushes, deferredFlushes.deferFlush(self) {
            pendingFlush.waiting = true
            return
        }
        pendingFlush.needed = false
        context.flush()
    }

    func flushDeferred() {
        pendingFlush.waiting = false
        flush()
    }
}

extension BurstFlushing where Self: ChannelInboundHandler, Self.OutboundOut == HTTP2Frame {
    /// Writes a frame; it leaves with the next flush.
    func writeFrame(_ frame: HTTP2Frame, _ context: ChannelHandlerContext) {
        pendingFlush.needed = true
        context.write(wrapOutboundOut(frame), promise: nil)
    }
}

/// The inbound connection window a frame-level HTTP/2 handler keeps open for all its streams: opened to `target`
/// when the connection starts (it begins at 65,535 whatever SETTINGS say, RFC 9113 §6.9.2), then given back as
/// bytes arrive, whoever owns them, once half of it was taken. Stream windows are the handlers' own business.
struct InboundConnectionWindow {
    let target: Int
    private var unacknowledged = 0

    init(target: Int) {
        self.target = target
    }

    /// The WINDOW_UPDATE increment for the start of the connection, if the window must grow.
    var openingIncrement: Int? { target > 65_535 ? target - 65_535 : nil }

    /// Counts a DATA frame's flow-controlled bytes; returns the increment to send once half the window was taken.
    mutating func received(_ data: HTTP2Frame.FramePayload.Data) -> Int? {
        unacknowledged += data.flowControlledLength
        guard unacknowledged >= target / 2 else { return nil }
        defer { unacknowledged = 0 }
        return unacknowledged
    }
}

extension HTTP2Frame.FramePayload.Data {
    /// The bytes the frame counts against flow-control windows: its data and padding (with the pad-length octet).
    var flowControlledLength: Int {
        data.readableBytes + (paddingBytes.map { $0 + 1 } ?? 0)
    }
}
