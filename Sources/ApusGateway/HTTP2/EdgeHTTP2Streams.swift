import NIOCore
import NIOHPACK
import NIOHTTP2

/// The call that owns a client stream claimed by `EdgeHTTP2Streams` (`GRPCEdgeStream`). Everything happens on the
/// client connection's event loop.
protocol EdgeStreamOwner: AnyObject {
    /// A frame the client sent on the owner's stream: the request HEADERS first, then DATA and trailers. Frames come
    /// only while the owner reads (`EdgeHTTP2Streams.setReading`).
    func clientFrame(_ payload: HTTP2Frame.FramePayload)
    /// The client's stream can take response bytes again (its window opened, the connection drained) after
    /// `EdgeHTTP2Streams.isWritable` said it could not.
    func clientStreamWritable()
    /// The stream is gone before the owner released it: the client reset it (`reason`), the stream or the
    /// connection closed.
    func clientStreamClosed(reason: HTTP2ErrorCode?)
    /// A DATA frame could not wait here: the gateway holds its limit of request bytes over all connections
    /// (`--http-max-buffered`). The frame is dropped; the owner ends the call.
    func clientBufferFull()
}

/// Sits right behind `NIOHTTP2Handler` (server mode, no inline multiplexer) on a client connection and decides on
/// each new stream's first HEADERS who serves it: a gRPC call to a function (content-type `application/grpc…`, not
/// the gateway's health or reflection services) is claimed by `makeOwner` and relayed as frames on this
/// connection, without a channel per stream; every other stream's frames and events go on to the
/// `HTTP2StreamMultiplexer` behind this handler, which gives them a stream channel as before (HTTP over HTTP/2,
/// health, reflection).
///
/// For the claimed streams it does what NIO's stream channels did:
/// * Request DATA: the client's stream window is given back as the owner takes the bytes; while the owner does not
///   read (its instance stream has no room), frames wait here, bounded by the window the client was given.
/// * Response DATA: NIO holds DATA the client's windows (stream and connection) do not cover yet. The bytes a
///   stream wrote and NIO has not sent (`unsent`) come from the stream's window as NIO reports it after each frame
///   it sends (`NIOHTTP2WindowUpdatedEvent`) and the window the client granted (SETTINGS_INITIAL_WINDOW_SIZE, its
///   WINDOW_UPDATEs) less the bytes written. `isWritable` says whether the client takes bytes now (little unsent,
///   socket writable), and the owner hears `clientStreamWritable()` once it does again: the watermarks of NIO's
///   stream channels.
/// * RST_STREAM and stream closure reach the owner; a closed connection ends every claimed call.
///
/// The connection window is kept open here for every stream (as bytes arrive), and writes are flushed once per
/// read burst (`DeferredFlushes`).
final class EdgeHTTP2Streams: ChannelInboundHandler, BurstFlushing {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    /// Builds the owner of a new stream from its request HEADERS, or nil to pass the stream on.
    typealias OwnerFactory = (EdgeHTTP2Streams, HTTP2StreamID, HPACKHeaders) -> (any EdgeStreamOwner)?

    private struct Stream {
        /// Nil once the owner released the stream; the entry stays until NIO closes the stream, so that its
        /// remaining frames are dropped here instead of reaching the multiplexer.
        var owner: (any EdgeStreamOwner)?
        /// The owner takes frames now.
        var reading = true
        /// Frames that arrived while the owner did not read.
        var queued: CircularBuffer<HTTP2Frame.FramePayload> = []
        /// DATA bytes in `queued`, counted in the gateway's body budget.
        var queuedBytes = 0
        /// Request bytes the owner took and the client's window has not got back yet.
        var unacknowledged = 0
        /// The client sent END_STREAM: no window to give back.
        var requestEnded = false
        /// The stream window the client granted less the response bytes written.
        var sendCredit: Int
        /// The stream window as NIO last reported it: granted less sent. `window - sendCredit` is what NIO holds.
        var window: Int
        /// The owner was told the client does not take bytes now and waits for `clientStreamWritable()`.
        var waiting = false
        /// Inside `setReading`'s hand-over of waiting frames (the owner may call back into it).
        var delivering = false
    }

    private let makeOwner: OwnerFactory
    private let streamWindowTarget: Int
    let deferredFlushes: DeferredFlushes?
    /// Counts the claimed streams for draining (the multiplexer's streams are counted by their channels).
    private let onStreamOpened: () -> Void
    private let onStreamClosed: () -> Void
    private var context: ChannelHandlerContext?
    private var streams: [HTTP2StreamID: Stream] = [:]
    /// The highest stream ID the client has opened: a HEADERS above it opens a new stream.
    private var lastStreamID = HTTP2StreamID.rootStream
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 §6.5.2 default until its SETTINGS arrive).
    private var peerInitialWindow = 65_535
    /// Response bytes of a stream NIO may hold before the owner hears it is not writable, and the level below
    /// which it hears it is again (those of NIO's stream channels).
    private static let unsentHighWatermark = 8_192
    private static let unsentLowWatermark = 4_096
    /// Request bytes received on the connection (any stream) and not yet given back.
    private var connectionWindow: InboundConnectionWindow
    /// Streams whose owners wait for `clientStreamWritable()`.
    private var waiting: [HTTP2StreamID] = []
    var pendingFlush = PendingFlush()
    var flushContext: ChannelHandlerContext? { context }
    private var activated = false
    /// Counts DATA bytes waiting here in the gateway's budget (`GatewayShared.holdBodyBytes`); nil: not counted.
    private let holdBytes: ((_ from: Int, _ to: Int) -> Bool)?
    /// DATA bytes waiting here over all claimed streams.
    private var queuedBytes = 0

    /// `streamWindow` is the SETTINGS_INITIAL_WINDOW_SIZE the edge announces, `connectionWindow` the connection
    /// window it keeps open.
    init(
        streamWindow: Int, connectionWindow: Int, deferredFlushes: DeferredFlushes?,
        onStreamOpened: @escaping () -> Void = {}, onStreamClosed: @escaping () -> Void = {},
        holdBytes: ((_ from: Int, _ to: Int) -> Bool)? = nil,
        makeOwner: @escaping OwnerFactory
    ) {
        self.holdBytes = holdBytes
        self.streamWindowTarget = streamWindow
        self.connectionWindow = InboundConnectionWindow(target: connectionWindow)
        self.deferredFlushes = deferredFlushes
        self.onStreamOpened = onStreamOpened
        self.onStreamClosed = onStreamClosed
        self.makeOwner = makeOwner
    }

    /// Claimed streams not yet closed (for tests).
    var claimedStreams: Int { streams.count }

    var eventLoop: (any EventLoop)? { context?.eventLoop }
    var allocator: ByteBufferAllocator { context?.channel.allocator ?? ByteBufferAllocator() }

    /// Whether the decision for a new stream's HEADERS is to claim it: a gRPC call that is not for the gateway's own
    /// health or reflection services.
    static func isRelayedGRPCCall(_ headers: HPACKHeaders) -> Bool {
        var contentType: String?
        var path: String?
        for field in headers {
            switch field.name {
            case "content-type": if contentType == nil { contentType = field.value }
            case ":path": if path == nil { path = field.value }
            default: break
            }
            if contentType != nil && path != nil { break }
        }
        guard let contentType, contentType.hasPrefix("application/grpc") else { return false }
        let rpcPath = path ?? ""
        if rpcPath.hasPrefix("/\(GRPCHealthStream.service)/") { return false }
        return !GRPCReflectionStream.services.contains(where: { rpcPath.hasPrefix("/\($0)/") })
    }

    // MARK: owners' side

    /// Writes response HEADERS, DATA or trailers; false when the stream is closed.
    @discardableResult
    func write(_ payload: HTTP2Frame.FramePayload, on streamID: HTTP2StreamID) -> Bool {
        guard let context, streams[streamID] != nil else { return false }
        if case .data(let data) = payload {
            streams[streamID]!.sendCredit -= data.data.readableBytes
        }
        writeFrame(HTTP2Frame(streamID: streamID, payload: payload), context)
        return true
    }

    /// Whether the client takes response bytes on the stream now: what NIO holds for it stays below the high
    /// watermark and the socket is writable. When it does not, the owner gets `clientStreamWritable()` once it
    /// does.
    func isWritable(_ streamID: HTTP2StreamID) -> Bool {
        guard let context, let stream = streams[streamID] else { return true }
        if stream.window - stream.sendCredit < Self.unsentHighWatermark && context.channel.isWritable { return true }
        if !stream.waiting {
            streams[streamID]!.waiting = true
            waiting.append(streamID)
        }
        return false
    }

    /// Starts or stops handing the client's frames to the owner. Stopped, they wait here and the client's window
    /// is not given back for them, so the client stops sending; started, what waited is handed over first.
    func setReading(_ enabled: Bool, on streamID: HTTP2StreamID) {
        guard streams[streamID] != nil else { return }
        streams[streamID]!.reading = enabled
        guard enabled, !streams[streamID]!.delivering, !streams[streamID]!.queued.isEmpty else { return }
        streams[streamID]!.delivering = true
        // What the owner writes to its instance while the waiting frames are handed over goes out in one flush.
        deferredFlushes?.begin()
        defer {
            if streams[streamID] != nil { streams[streamID]!.delivering = false }
            deferredFlushes?.end()
        }
        while let stream = streams[streamID], stream.reading, let owner = stream.owner, !stream.queued.isEmpty {
            let payload = streams[streamID]!.queued.removeFirst()
            if case .data(let data) = payload { unqueued(data.data.readableBytes, on: streamID) }
            deliver(payload, to: owner, on: streamID)
        }
        flush()
    }

    /// The owner is done with the stream. While the stream is open it is ended here: RST_STREAM(CANCEL) when the
    /// response did not end (the call was cut short), RST_STREAM(NO_ERROR) when the response is complete but the
    /// client is still sending (RFC 9113 §8.1: it stops, and the status it has stands).
    func release(_ streamID: HTTP2StreamID, responseEnded: Bool) {
        guard let context, let stream = streams[streamID] else { return }
        streams[streamID]!.owner = nil
        streams[streamID]!.queued.removeAll()
        unqueued(stream.queuedBytes, on: streamID)
        let reset: HTTP2ErrorCode? = !responseEnded ? .cancel : (stream.requestEnded ? nil : .noError)
        if let reset {
            writeFrame(HTTP2Frame(streamID: streamID, payload: .rstStream(reset)), context)
        }
        flush()
    }

    // MARK: connection

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { becameActive(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        closeAll()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        becameActive(context)
        context.fireChannelActive()
    }

    private func becameActive(_ context: ChannelHandlerContext) {
        guard !activated else { return }
        activated = true
        if let increment = connectionWindow.openingIncrement {
            writeFrame(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment)), context)
            flush()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let streamID = frame.streamID
        if case .data(let payload) = frame.payload {
            if let increment = connectionWindow.received(payload) {
                writeFrame(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: increment)), context)
            }
        }
        if streamID == .rootStream {
            if case .settings(.settings(let settings)) = frame.payload { peerSettings(settings) }
            context.fireChannelRead(data)
            return
        }
        if streams[streamID] != nil {
            claimedFrame(frame.payload, on: streamID, context)
            return
        }
        if streamID > lastStreamID, case .headers(let headers) = frame.payload {
            // A new stream (client stream IDs only grow): claim it or pass it on.
            lastStreamID = streamID
            if Self.isRelayedGRPCCall(headers.headers), let owner = makeOwner(self, streamID, headers.headers) {
                streams[streamID] = Stream(owner: owner, sendCredit: peerInitialWindow, window: peerInitialWindow)
                onStreamOpened()
                if headers.endStream { streams[streamID]!.requestEnded = true }
                owner.clientFrame(frame.payload)
                return
            }
        }
        context.fireChannelRead(data)
    }

    private func claimedFrame(_ payload: HTTP2Frame.FramePayload, on streamID: HTTP2StreamID, _ context: ChannelHandlerContext) {
        switch payload {
        case .headers(let headers):
            if headers.endStream { streams[streamID]!.requestEnded = true }
            clientPayload(payload, on: streamID)
        case .data(let data):
            if data.endStream { streams[streamID]!.requestEnded = true }
            clientPayload(payload, on: streamID)
        case .windowUpdate(let increment):
            // NIO sends what it held as far as the window now goes; its NIOHTTP2WindowUpdatedEvent follows.
            streams[streamID]!.sendCredit += increment
        default:
            // RST_STREAM: the StreamClosedEvent that follows ends the call. PRIORITY: nothing to do.
            break
        }
    }

    private func clientPayload(_ payload: HTTP2Frame.FramePayload, on streamID: HTTP2StreamID) {
        let stream = streams[streamID]!
        guard let owner = stream.owner else { return }  // released: the stream is being closed
        if stream.reading && stream.queued.isEmpty {
            deliver(payload, to: owner, on: streamID)
            return
        }
        if case .data(let data) = payload, let holdBytes {
            let count = data.data.readableBytes
            guard holdBytes(queuedBytes, queuedBytes + count) else {
                owner.clientBufferFull()
                return
            }
            queuedBytes += count
            streams[streamID]!.queuedBytes += count
        }
        streams[streamID]!.queued.append(payload)
    }

    /// Hands a frame to its owner and gives the client's stream window back once half of it was taken (as NIO's
    /// stream channels do).
    private func deliver(_ payload: HTTP2Frame.FramePayload, to owner: any EdgeStreamOwner, on streamID: HTTP2StreamID) {
        if case .data(let data) = payload {
            streams[streamID]!.unacknowledged += data.flowControlledLength
            let stream = streams[streamID]!
            if !stream.requestEnded, stream.unacknowledged >= streamWindowTarget / 2, let context {
                streams[streamID]!.unacknowledged = 0
                writeFrame(HTTP2Frame(streamID: streamID, payload: .windowUpdate(windowSizeIncrement: stream.unacknowledged)), context)
            }
        }
        owner.clientFrame(payload)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flush()
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case let updated as NIOHTTP2WindowUpdatedEvent:
            // The connection window is ours (see channelRead): the multiplexer does not get the root stream's.
            if updated.streamID == .rootStream { return }
            if streams[updated.streamID] != nil {
                if let window = updated.outboundWindowSize {
                    streams[updated.streamID]!.window = window
                    wakeIfWaiting(updated.streamID)
                }
                return
            }
        case let created as NIOHTTP2StreamCreatedEvent:
            if streams[created.streamID] != nil { return }
        case let closed as StreamClosedEvent:
            if let stream = streams[closed.streamID] {
                unqueued(stream.queuedBytes, on: closed.streamID)
                streams[closed.streamID] = nil
                onStreamClosed()
                stream.owner?.clientStreamClosed(reason: closed.reason)
                return
            }
        default:
            break
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { wakeWaiting() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closeAll()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A frame written on a claimed stream failed (NIO's view of the stream moved on first): the stream's
        // StreamClosedEvent ends the call; the multiplexer knows nothing of the stream.
        if let streamError = error as? NIOHTTP2Errors.StreamError, streams[streamError.streamID] != nil { return }
        context.fireErrorCaught(error)
    }

    // MARK: helpers

    /// The connection is gone: every claimed call ends.
    private func closeAll() {
        guard !streams.isEmpty else { return }
        let owners = streams.values.compactMap(\.owner)
        let count = streams.count
        if queuedBytes > 0 {
            _ = holdBytes?(queuedBytes, 0)
            queuedBytes = 0
        }
        streams.removeAll()
        waiting.removeAll()
        for _ in 0..<count { onStreamClosed() }
        for owner in owners { owner.clientStreamClosed(reason: nil) }
    }

    /// `count` DATA bytes of the stream left the queue (handed over or dropped).
    private func unqueued(_ count: Int, on streamID: HTTP2StreamID) {
        guard count > 0, let holdBytes else { return }
        _ = holdBytes(queuedBytes, queuedBytes - count)
        queuedBytes -= count
        if streams[streamID] != nil { streams[streamID]!.queuedBytes -= count }
    }

    private func peerSettings(_ settings: HTTP2Settings) {
        for setting in settings where setting.parameter == .initialWindowSize {
            // A new initial window moves every open stream's window by the difference (RFC 9113 §6.9.2).
            let delta = setting.value - peerInitialWindow
            peerInitialWindow = setting.value
            guard delta != 0 else { continue }
            for streamID in streams.keys {
                streams[streamID]!.sendCredit += delta
                streams[streamID]!.window += delta
            }
        }
    }

    /// NIO sent some of what it held for the stream: its owner goes on once that is below the low watermark.
    private func wakeIfWaiting(_ streamID: HTTP2StreamID) {
        guard let stream = streams[streamID], stream.waiting,
              stream.window - stream.sendCredit <= Self.unsentLowWatermark else { return }
        wakeWaiting()
    }

    /// Tells every waiting owner whose client takes bytes again to go on.
    private func wakeWaiting() {
        guard !waiting.isEmpty, let context, context.channel.isWritable else { return }
        let streamIDs = waiting
        waiting.removeAll(keepingCapacity: true)
        for streamID in streamIDs {
            guard let stream = streams[streamID], stream.waiting else { continue }
            if stream.window - stream.sendCredit <= Self.unsentLowWatermark {
                streams[streamID]!.waiting = false
                stream.owner?.clientStreamWritable()
            } else {
                waiting.append(streamID)
            }
        }
    }
}
