import NIOCore
import NIOHPACK
import NIOHTTP2

/// The call that owns a stream on an instance connection (`GRPCEdgeStream`). Everything happens on the
/// connection's event loop.
protocol InstanceStreamOwner: AnyObject {
    /// A HEADERS or DATA frame the instance sent on the owner's stream.
    func instanceFrame(_ payload: HTTP2Frame.FramePayload)
    /// The end of a read burst from the instance: flush what was passed on to the client.
    func instanceReadComplete()
    /// Whether response bytes handed to the owner are taken by the client now (its stream is writable). Bytes
    /// not taken are given back to the instance's window later, by `InstanceConnectionHandler.clientTookBytes`.
    var clientWritable: Bool { get }
    /// The stream can take request DATA again (the instance's window opened, the connection drained).
    func instanceStreamWritable()
    /// The stream ended without a complete response: reset by the instance, refused by GOAWAY, connection lost.
    func instanceStreamFailed(_ reason: String)
}

/// The one handler behind `NIOHTTP2Handler` (client mode, no stream multiplexer) on a connection to an instance:
/// relays work on `HTTP2Frame`s here instead of on a child channel per stream. It allocates stream IDs (odd,
/// increasing), writes the relays' HEADERS, DATA and RST_STREAM frames, and dispatches what the instance sends to
/// the stream's owner by stream ID.
///
/// Flow control is ours, both ways:
/// * Response DATA: the connection window is given back as bytes arrive (the stream windows bound what is held);
///   a stream's window is given back as the client takes the bytes (its stream is writable), so a slow client
///   slows the function and at most one stream window per call is held in the gateway.
/// * Request DATA: each stream's send credit follows the instance's window (SETTINGS_INITIAL_WINDOW_SIZE, its
///   WINDOW_UPDATEs, the bytes written); a relay reads from its client only while its stream has credit and the
///   connection is writable, so what NIO's handler buffers beyond the window stays within one window per stream.
final class InstanceConnectionHandler: ChannelInboundHandler, BurstFlushing {
    typealias InboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    private struct Stream {
        var owner: any InstanceStreamOwner
        /// Request bytes the instance's window still takes (below zero when a frame, or what the client sent
        /// before the stream opened, overshoots it: the client is then not read until WINDOW_UPDATEs cover it).
        var sendCredit: Int
        /// Response bytes taken by the client and not yet given back to the instance.
        var unacknowledged = 0
        /// Response bytes handed to the owner while its client was not writable.
        var held = 0
        /// The instance ended its side (END_STREAM): no window to give back.
        var responseEnded = false
        /// The owner was told it cannot send (credit or connection writability) and waits for a wake-up.
        var blocked = false
        /// Flush the owner at the end of this read burst.
        var flushScheduled = false
    }

    /// Called once the connection preface is out (streams may start), once when the connection stops taking
    /// new streams (GOAWAY, closing), and once when it has closed.
    var onReady: ((InstanceConnectionHandler) -> Void)?
    var onDraining: (() -> Void)?
    var onClosed: (() -> Void)?

    private let streamWindowTarget: Int
    private var context: ChannelHandlerContext?
    private var streams: [HTTP2StreamID: Stream] = [:]
    private var nextStreamID = 1
    /// The instance's SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 §6.5.2 default until its SETTINGS arrive).
    private var peerInitialWindow = 65_535
    /// Response bytes received on the connection and not yet given back (connection window).
    private var connectionWindow: InboundConnectionWindow
    /// Owners that got frames in this read burst: flushed at its end (also when their call has just finished).
    private var toFlush: [(streamID: HTTP2StreamID, owner: any InstanceStreamOwner)] = []
    let deferredFlushes: DeferredFlushes?
    /// Inside a read burst (between the first channelRead and channelReadComplete).
    private var inBurst = false
    /// Writes not flushed yet, and whether the flush waits for the end of a read burst.
    var pendingFlush = PendingFlush()
    var flushContext: ChannelHandlerContext? { context }
    /// Streams whose owners wait for `instanceStreamWritable()`.
    private var blocked: [HTTP2StreamID] = []
    private(set) var isDraining = false
    private(set) var isClosed = false

    /// `streamWindow` is the SETTINGS_INITIAL_WINDOW_SIZE the gateway announces, `connectionWindow` the
    /// connection window it keeps open; `deferredFlushes` holds client connection flushes back during a read
    /// burst, so that each client connection is flushed once per burst.
    init(streamWindow: Int, connectionWindow: Int, deferredFlushes: DeferredFlushes? = nil) {
        self.streamWindowTarget = streamWindow
        self.connectionWindow = InboundConnectionWindow(target: connectionWindow)
        self.deferredFlushes = deferredFlushes
    }

    /// Streams currently owned by calls (for tests and draining).
    var openStreams: Int { streams.count }

    // MARK: relays' side

    /// Opens a stream: allocates its ID and writes the request HEADERS. Nil when this connection takes no new
    /// streams (GOAWAY, closed, stream IDs used up); the caller then opens another connection.
    func startStream(owner: any InstanceStreamOwner, headers: HPACKHeaders, endStream: Bool) -> HTTP2StreamID? {
        guard let context, !isDraining, !isClosed, nextStreamID <= Int(Int32.max) else { return nil }
        let streamID = HTTP2StreamID(nextStreamID)
        nextStreamID += 2
        if nextStreamID > Int(Int32.max) { beginDraining() }
        streams[streamID] = Stream(owner: owner, sendCredit: peerInitialWindow)
        writeFrame(HTTP2Frame(streamID: streamID, payload: .headers(.init(headers: headers, endStream: endStream))), context)
        return streamID
    }

    /// Writes request HEADERS (trailers) or DATA; false when the stream is gone.
    @discardableResult
    func write(_ payload: HTTP2Frame.FramePayload, on streamID: HTTP2StreamID) -> Bool {
        guard let context, streams[streamID] != nil else { return false }
        if case .data(let data) = payload {
            streams[streamID]!.sendCredit -= data.data.readableBytes
        }
        writeFrame(HTTP2Frame(streamID: streamID, payload: payload), context)
        return true
    }

    /// Whether the stream can take more request DATA now. When it cannot, its owner gets
    /// `instanceStreamWritable()` once it can.
    func canSend(on streamID: HTTP2StreamID) -> Bool {
        guard let context, let stream = streams[streamID] else { return true }
        if stream.sendCredit > 0 && context.channel.isWritable { return true }
        if !stream.blocked {
            streams[streamID]!.blocked = true
            blocked.append(streamID)
        }
        return false
    }

    /// The client took response bytes held since its stream was not writable: give them back to the instance.
    func clientTookBytes(on streamID: HTTP2StreamID) {
        guard let stream = streams[streamID], stream.held > 0 else { return }
        streams[streamID]!.unacknowledged += stream.held
        streams[streamID]!.held = 0
        giveBackStreamWindow(streamID)
    }

    /// Ends the call's use of the stream. `reset`: the instance has not ended it, so RST_STREAM(CANCEL) ends it
    /// there; `endRequest`: the instance has ended it but the request side is open, so an empty DATA with
    /// END_STREAM closes it without a reset (servers count resets as abuse).
    func release(_ streamID: HTTP2StreamID, reset: Bool, endRequest: Bool) {
        guard let context, streams.removeValue(forKey: streamID) != nil else { return }
        if reset {
            writeFrame(HTTP2Frame(streamID: streamID, payload: .rstStream(.cancel)), context)
        } else if endRequest {
            writeFrame(HTTP2Frame(streamID: streamID, payload: .data(.init(data: .byteBuffer(ByteBuffer()), endStream: true))), context)
        }
        flush()
        closeIfDrained()
    }

    /// Closes the connection, after what is written and waits for a deferred flush.
    func close() {
        guard let context else { return }
        if pendingFlush.needed {
            pendingFlush.needed = false
            context.flush()
        }
        context.close(promise: nil)
    }

    // MARK: connection

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { becameActive(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        endBurst()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        becameActive(context)
    }

    private var activated = false

    private func becameActive(_ context: ChannelHandlerContext) {
        guard !activated else { return }
        activated = true
        if let increment = connectionWindow.openingIncrement {
            writeFrame(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment)), context)
            flush()
        }
        onReady?(self)
        onReady = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let streamID = frame.streamID
        if !inBurst {
            inBurst = true
            deferredFlushes?.begin()
        }
        switch frame.payload {
        case .headers(let headers):
            guard let owner = streams[streamID]?.owner else { return }
            if headers.endStream { streams[streamID]!.responseEnded = true }
            scheduleFlush(streamID)
            owner.instanceFrame(frame.payload)
        case .data(let data):
            let length = data.flowControlledLength
            if let increment = connectionWindow.received(data) {
                writeFrame(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment)), context)
            }
            guard let owner = streams[streamID]?.owner else { return }
            if data.endStream {
                streams[streamID]!.responseEnded = true
            } else if owner.clientWritable {
                streams[streamID]!.unacknowledged += length
            } else {
                streams[streamID]!.held += length
            }
            scheduleFlush(streamID)
            owner.instanceFrame(frame.payload)
            if !data.endStream { giveBackStreamWindow(streamID) }
        case .rstStream(let code):
            guard let stream = streams.removeValue(forKey: streamID) else { return }
            stream.owner.instanceStreamFailed("the instance reset the stream (\(code))")
            closeIfDrained()
        case .windowUpdate(let increment):
            if streamID == .rootStream {
                wakeBlocked()
            } else if streams[streamID] != nil {
                streams[streamID]!.sendCredit += increment
                wakeIfBlocked(streamID)
            }
        case .settings(.settings(let settings)):
            for setting in settings where setting.parameter == .initialWindowSize {
                // A new initial window moves every open stream's window by the difference (RFC 9113 §6.9.2).
                let delta = setting.value - peerInitialWindow
                peerInitialWindow = setting.value
                guard delta != 0 else { continue }
                for streamID in streams.keys { streams[streamID]!.sendCredit += delta }
                if delta > 0 { wakeBlocked() }
            }
        case .goAway:
            // No new streams here. Streams above its last stream ID were not processed: NIO closes them
            // (StreamClosedEvent, below). The others finish, then the connection closes.
            beginDraining()
            closeIfDrained()
        default:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !toFlush.isEmpty {
            let owners = toFlush
            toFlush.removeAll(keepingCapacity: true)
            for (streamID, owner) in owners {
                if streams[streamID] != nil { streams[streamID]!.flushScheduled = false }
                owner.instanceReadComplete()
            }
        }
        flush()
        endBurst()
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let closed = event as? StreamClosedEvent {
            // A stream still owned here ended without the instance finishing its response: reset, refused after
            // GOAWAY, or a stream error.
            if let stream = streams.removeValue(forKey: closed.streamID) {
                if !stream.responseEnded {
                    stream.owner.instanceStreamFailed(
                        closed.reason.map { "the stream to the instance was closed (\($0))" } ?? "the stream to the instance was closed")
                }
                closeIfDrained()
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { wakeBlocked() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isClosed = true
        beginDraining()
        let owners = streams.values.map(\.owner)
        streams.removeAll()
        blocked.removeAll()
        for owner in owners { owner.instanceStreamFailed("the connection to the instance closed") }
        toFlush.removeAll()
        endBurst()
        onReady = nil
        onClosed?()
        onClosed = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let streamError = error as? NIOHTTP2Errors.StreamError {
            // One stream failed (NIO resets it); the connection carries on.
            if let stream = streams.removeValue(forKey: streamError.streamID) {
                stream.owner.instanceStreamFailed("stream error: \(streamError.baseError)")
                closeIfDrained()
            }
            return
        }
        context.close(promise: nil)
    }

    // MARK: helpers

    private func beginDraining() {
        guard !isDraining else { return }
        isDraining = true
        onDraining?()
        onDraining = nil
    }

    /// After GOAWAY, the connection closes once its last stream is done.
    private func closeIfDrained() {
        if isDraining, streams.isEmpty, !isClosed { close() }
    }

    private func scheduleFlush(_ streamID: HTTP2StreamID) {
        guard !streams[streamID]!.flushScheduled else { return }
        streams[streamID]!.flushScheduled = true
        toFlush.append((streamID, streams[streamID]!.owner))
    }

    private func endBurst() {
        guard inBurst else { return }
        inBurst = false
        deferredFlushes?.end()
    }

    /// Gives a stream's window back once half of it has been taken by the client (as NIO's own streams do).
    private func giveBackStreamWindow(_ streamID: HTTP2StreamID) {
        guard let context, let stream = streams[streamID], !stream.responseEnded,
              stream.unacknowledged > 0, stream.unacknowledged >= streamWindowTarget / 2 else { return }
        streams[streamID]!.unacknowledged = 0
        writeFrame(HTTP2Frame(streamID: streamID, payload: .windowUpdate(windowSizeIncrement: stream.unacknowledged)), context)
    }

    private func wakeIfBlocked(_ streamID: HTTP2StreamID) {
        guard let stream = streams[streamID], stream.blocked, stream.sendCredit > 0 else { return }
        wakeBlocked()
    }

    /// Tells every waiting owner whose stream has credit again (and the connection is writable) to go on.
    private func wakeBlocked() {
        guard !blocked.isEmpty, let context, context.channel.isWritable else { return }
        let waiting = blocked
        blocked.removeAll(keepingCapacity: true)
        for streamID in waiting {
            guard let stream = streams[streamID], stream.blocked else { continue }
            if stream.sendCredit > 0 {
                streams[streamID]!.blocked = false
                stream.owner.instanceStreamWritable()
            } else {
                blocked.append(streamID)
            }
        }
    }
}
