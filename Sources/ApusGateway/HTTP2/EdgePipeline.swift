import ApusCore
import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOTLS

/// Builds the per-connection pipelines of the edge. A plaintext connection starts with `EdgeProtocolDetector`,
/// which picks HTTP/2 (the client sent the connection preface: h2c with prior knowledge) or HTTP/1.1; a TLS
/// connection picks by ALPN. HTTP/1.1 connections may still move to HTTP/2 with `Upgrade: h2c`.
enum EdgePipeline {
    /// Adds the HTTP/2 server handlers: NIO's `NIOHTTP2Handler` without its inline stream multiplexer,
    /// `EdgeHTTP2Streams`, which claims the gRPC calls to functions and relays them as frames, and NIO's
    /// `HTTP2StreamMultiplexer` for every other stream (a channel each, routed by `EdgeStreamRouter` on its first
    /// HEADERS).
    static func configureHTTP2(
        _ channel: any Channel, shared: GatewayShared, scheme: String
    ) throws {
        let limits = shared.configuration.http2
        var connectionConfiguration = NIOHTTP2Handler.ConnectionConfiguration()
        connectionConfiguration.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: limits.maxConcurrentStreams),
            HTTP2Setting(parameter: .initialWindowSize, value: limits.initialWindowSize),
            HTTP2Setting(parameter: .maxFrameSize, value: limits.maxFrameSize),
            HTTP2Setting(parameter: .maxHeaderListSize, value: limits.maxHeaderListSize),
        ]
        connectionConfiguration.targetWindowSize = limits.connectionWindowSize
        let peer = channel.remoteAddress?.ipAddress ?? "unknown"
        let guardHandler = HTTP2ConnectionGuard(shared: shared)
        let boundGuard = NIOLoopBound(guardHandler, eventLoop: channel.eventLoop)
        let loopPool = shared.instanceHTTP2Pool(for: channel.eventLoop)
        let eventLoop = channel.eventLoop
        let streams = EdgeHTTP2Streams(
            streamWindow: limits.initialWindowSize, connectionWindow: limits.connectionWindowSize,
            deferredFlushes: loopPool.deferredFlushes,
            onStreamOpened: { boundGuard.value.streamOpened() },
            onStreamClosed: { boundGuard.value.streamClosed() },
            holdBytes: { from, to in shared.holdBodyBytes(from: from, to: to) }
        ) { edge, streamID, _ in
            GRPCEdgeStream(shared: shared, peer: peer, edge: edge, streamID: streamID, eventLoop: eventLoop)
        }
        let multiplexer = HTTP2StreamMultiplexer(
            mode: .server, channel: channel, targetWindowSize: limits.initialWindowSize,
            inboundStreamInitializer: { stream in
                stream.eventLoop.makeCompletedFuture {
                    boundGuard.value.streamOpened(stream)
                    try stream.pipeline.syncOperations.addHandler(EdgeStreamRouter(shared: shared, peer: peer, scheme: scheme))
                }
            })
        let operations = channel.pipeline.syncOperations
        // Towards the socket from the HTTP/2 handler: one flush per instance read burst, not one per call.
        try operations.addHandler(EdgeFlushCoalescer(loopPool.deferredFlushes))
        try operations.addHandler(NIOHTTP2Handler(mode: .server, connectionConfiguration: connectionConfiguration))
        try operations.addHandler(streams)
        // Before the multiplexer: errors it passes on after giving them to a stream channel stay away from the
        // guard (a stream's error is not the connection's).
        try operations.addHandler(guardHandler)
        try operations.addHandler(multiplexer)
    }

    /// Adds the HTTP/1.1 edge handler.
    static func configureHTTP1(_ channel: any Channel, shared: GatewayShared, scheme: String) throws {
        try channel.pipeline.syncOperations.addHandler(GatewayConnectionHandler(shared: shared, scheme: scheme))
    }

    /// TLS: the certificate's handshake, then HTTP/2 or HTTP/1.1 as ALPN agreed (HTTP/1.1 without ALPN).
    static func configureTLS(_ channel: any Channel, shared: GatewayShared, sslHandler: any ChannelHandler) throws {
        try channel.pipeline.syncOperations.addHandler(sslHandler)
        try channel.pipeline.syncOperations.addHandler(ApplicationProtocolNegotiationHandler { result, channel in
            channel.eventLoop.makeCompletedFuture {
                if case .negotiated("h2") = result {
                    try configureHTTP2(channel, shared: shared, scheme: "https")
                } else {
                    try configureHTTP1(channel, shared: shared, scheme: "https")
                }
            }
        })
    }

    static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    /// Bytes of the preface that make a connection unmistakably an attempt at HTTP/2 (`PRI * HTTP/2`): no HTTP/1.x
    /// request starts so, and an HTTP/1.1 parser would only answer 505 to it.
    static let attemptedPrefaceLength = 12

    /// What a plaintext connection's first bytes say it speaks.
    enum FirstBytes: Equatable {
        /// The whole HTTP/2 connection preface (h2c with prior knowledge).
        case http2
        /// A prefix of the preface: wait for more bytes.
        case undecided
        /// An attempted preface that is not the preface (RFC 9113 §3.4: a connection error of type PROTOCOL_ERROR).
        case invalidPreface
        /// Anything else: HTTP/1.x.
        case http1
    }

    static func sniff<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> FirstBytes {
        var index = bytes.startIndex
        var matched = 0
        while matched < preface.count, index != bytes.endIndex {
            guard bytes[index] == preface[matched] else {
                return matched >= attemptedPrefaceLength ? .invalidPreface : .http1
            }
            matched += 1
            index = bytes.index(after: index)
        }
        return matched == preface.count ? .http2 : .undecided
    }

    /// How long a connection refused for its preface keeps reading (and dropping) before it closes.
    static let lingerAfterGoaway = TimeAmount.seconds(1)

    /// What the server writes to an invalid preface before closing: its own (empty) SETTINGS, the server's preface,
    /// then GOAWAY(last stream 0, PROTOCOL_ERROR) with the reason as debug data (RFC 9113 §3.4, §6.8).
    static func invalidPrefaceReply(allocator: ByteBufferAllocator) -> ByteBuffer {
        let reason = Array("invalid connection preface".utf8)
        var out = allocator.buffer(capacity: 9 + 9 + 8 + reason.count)
        // SETTINGS: length 0, type 0x4, no flags, stream 0.
        out.writeBytes([0, 0, 0, 0x4, 0])
        out.writeInteger(UInt32(0))
        // GOAWAY: length 8 + debug data, type 0x7, no flags, stream 0; last stream id 0, error code PROTOCOL_ERROR (1).
        let length = 8 + reason.count
        out.writeBytes([UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF), 0x7, 0])
        out.writeInteger(UInt32(0))
        out.writeInteger(UInt32(0))
        out.writeInteger(UInt32(1))
        out.writeBytes(reason)
        return out
    }
}

/// First handler of a plaintext connection: looks at the first bytes, installs HTTP/2 (connection preface) or
/// HTTP/1.1 (anything else) behind itself, hands them the bytes and steps aside. An attempted preface that is not
/// the preface gets SETTINGS + GOAWAY(PROTOCOL_ERROR) and the connection closes.
final class EdgeProtocolDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let shared: GatewayShared
    private var buffered: ByteBuffer?
    /// An invalid preface was answered with GOAWAY; what else arrives is dropped until the connection closes.
    private var refused = false

    init(shared: GatewayShared) {
        self.shared = shared
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        var incoming = unwrapInboundIn(data)
        if buffered == nil { buffered = incoming } else { buffered!.writeBuffer(&incoming) }
        let firstBytes = EdgePipeline.sniff(buffered!.readableBytesView)
        do {
            switch firstBytes {
            case .undecided:
                return  // wait for the rest of the preface
            case .invalidPreface:
                buffered = nil
                refused = true
                shared.logger.debug("invalid HTTP/2 connection preface; GOAWAY(PROTOCOL_ERROR)")
                // Lingering close: the reply goes out, the write side shuts, and what the peer still sends is read
                // and dropped for a moment, so its unread bytes do not turn the close into a reset that could
                // discard the GOAWAY before the peer reads it.
                let channel = context.channel
                context.writeAndFlush(wrapOutboundOut(EdgePipeline.invalidPrefaceReply(allocator: channel.allocator)))
                    .assumeIsolated().whenComplete { _ in
                        channel.close(mode: .output, promise: nil)
                        channel.eventLoop.scheduleTask(in: EdgePipeline.lingerAfterGoaway) { channel.close(promise: nil) }
                    }
                return
            case .http2:
                try EdgePipeline.configureHTTP2(context.channel, shared: shared, scheme: "http")
            case .http1:
                try EdgePipeline.configureHTTP1(context.channel, shared: shared, scheme: "http")
            }
        } catch {
            context.close(promise: nil)
            return
        }
        let bytesSoFar = buffered!
        buffered = nil
        context.fireChannelRead(wrapInboundOut(bytesSoFar))
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
    }
}

/// Connection-level duties of an HTTP/2 connection: counts open streams (stream channels and claimed calls alike),
/// closes the connection after a connection error (the HTTP/2 handler has already sent GOAWAY with the error code),
/// and on graceful shutdown sends GOAWAY and closes once the open streams are done. Sits between
/// `EdgeHTTP2Streams` and the stream multiplexer, passing everything on.
final class HTTP2ConnectionGuard: ChannelInboundHandler, DrainableConnection {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame

    private let shared: GatewayShared
    private var context: ChannelHandlerContext?
    private var openStreams = 0
    /// Whether streams are open (for `ConnectionTimeouts`).
    var hasStreamsOpen: Bool { openStreams > 0 }
    private var draining = false

    init(shared: GatewayShared) {
        self.shared = shared
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        shared.register(self, id: ObjectIdentifier(self), eventLoop: context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        shared.unregister(id: ObjectIdentifier(self))
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        shared.unregister(id: ObjectIdentifier(self))
        context.fireChannelInactive()
    }

    /// A stream channel of the multiplexer opened; it counts until its channel closes.
    func streamOpened(_ stream: any Channel) {
        streamOpened()
        stream.closeFuture.assumeIsolated().whenComplete { [self] _ in streamClosed() }
    }

    /// A stream opened (`EdgeHTTP2Streams` claimed a call, or a stream channel opened).
    func streamOpened() {
        openStreams += 1
    }

    /// A stream counted by `streamOpened()` closed.
    func streamClosed() {
        openStreams -= 1
        guard draining, openStreams == 0, let context else { return }
        // A claimed call's stream closes while its last frame is being written: close after that write is done
        // and flushed, not in the middle of it.
        context.eventLoop.assumeIsolated().execute { [self] in
            guard let context = self.context else { return }
            context.flush()
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is NIOHTTP2Errors.StreamError {
            // A frame a stream channel wrote failed: the multiplexer behind tells that stream.
            context.fireErrorCaught(error)
            return
        }
        shared.logger.debug("HTTP/2 connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }

    func beginDrain() {
        guard !draining, let context else { return }
        draining = true
        let goAway = HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
        context.writeAndFlush(NIOAny(goAway), promise: nil)
        if openStreams == 0 { context.close(promise: nil) }
    }
}

/// First handler of every stream channel (the streams `EdgeHTTP2Streams` did not claim): on the first HEADERS it
/// installs the gateway's health or reflection service (content-type `application/grpc…`) or the HTTP-over-HTTP/2
/// relay, then steps aside.
final class EdgeStreamRouter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = HTTP2Frame.FramePayload

    private let shared: GatewayShared
    private let peer: String
    private let scheme: String

    init(shared: GatewayShared, peer: String, scheme: String) {
        self.shared = shared
        self.peer = peer
        self.scheme = scheme
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .headers(let headers) = unwrapInboundIn(data) else {
            context.close(promise: nil)
            return
        }
        let contentType = headers.headers.first(name: "content-type") ?? ""
        let isGRPC = contentType.hasPrefix("application/grpc")
        let operations = context.pipeline.syncOperations
        do {
            if isGRPC {
                let path = headers.headers.first(name: ":path") ?? ""
                if path.hasPrefix("/\(GRPCHealthStream.service)/") {
                    try operations.addHandler(GRPCHealthStream(shared: shared), position: .after(self))
                } else if GRPCReflectionStream.services.contains(where: { path.hasPrefix("/\($0)/") }) {
                    try operations.addHandler(GRPCReflectionStream(shared: shared), position: .after(self))
                } else {
                    // gRPC calls to functions are claimed before a channel is made (`EdgeHTTP2Streams`).
                    context.close(promise: nil)
                    return
                }
            } else {
                try operations.addHandlers(
                    [HTTP2FramePayloadToHTTP1ServerCodec(), HTTPOverHTTP2Stream(shared: shared, peer: peer, scheme: scheme)],
                    position: .after(self))
            }
        } catch {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
        operations.removeHandler(context: context, promise: nil)
    }
}

/// Moves an HTTP/1.1 connection that asked for `Upgrade: h2c` to HTTP/2. After the 101 the client sends the
/// connection preface and its SETTINGS; this handler lets those through first, then slips in the upgrading
/// request as stream 1 (a HEADERS frame with END_STREAM, literal HPACK fields that leave the decoder's dynamic
/// table untouched), passes everything else through and steps aside.
final class H2CUpgradeSplicer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var buffered: ByteBuffer?
    private let stream1: ByteBuffer

    init(stream1HeadersFrame: ByteBuffer) {
        self.stream1 = stream1HeadersFrame
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil { buffered = incoming } else { buffered!.writeBuffer(&incoming) }
        var bytes = buffered!
        let prefaceLength = EdgePipeline.preface.count
        // The preface and the first frame (SETTINGS) must be complete before stream 1 goes in behind them.
        guard bytes.readableBytes >= prefaceLength + 9,
              let length = bytes.getInteger(at: bytes.readerIndex + prefaceLength, as: UInt32.self).map({ Int($0 >> 8) }),
              bytes.readableBytes >= prefaceLength + 9 + length else { return }
        buffered = nil
        let head = bytes.readSlice(length: prefaceLength + 9 + length)!
        context.fireChannelRead(wrapInboundOut(head))
        context.fireChannelRead(wrapInboundOut(stream1))
        if bytes.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(bytes)) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    /// A HEADERS frame for stream 1 carrying `fields` (names already lowercase), or nil when it would not fit in
    /// one frame of the default 16 KiB maximum.
    static func headersFrame(_ fields: [(String, String)], allocator: ByteBufferAllocator) -> ByteBuffer? {
        var block = allocator.buffer(capacity: 512)
        for (name, value) in fields {
            block.writeInteger(UInt8(0x00))  // literal header field without indexing, new name
            writeLength(name.utf8.count, into: &block)
            block.writeString(name)
            writeLength(value.utf8.count, into: &block)
            block.writeString(value)
        }
        guard block.readableBytes <= 16_384 else { return nil }
        var frame = allocator.buffer(capacity: 9 + block.readableBytes)
        frame.writeInteger(UInt32(block.readableBytes) << 8 | 0x01)  // 24-bit length, type HEADERS
        frame.writeInteger(UInt8(0x05))  // END_STREAM | END_HEADERS
        frame.writeInteger(UInt32(1))  // stream 1
        frame.writeBuffer(&block)
        return frame
    }

    /// HPACK string length: 7-bit prefix integer, no Huffman coding.
    private static func writeLength(_ length: Int, into buffer: inout ByteBuffer) {
        if length < 127 {
            buffer.writeInteger(UInt8(length))
            return
        }
        buffer.writeInteger(UInt8(127))
        var rest = length - 127
        while rest >= 128 {
            buffer.writeInteger(UInt8(rest & 0x7F | 0x80))
            rest >>= 7
        }
        buffer.writeInteger(UInt8(rest))
    }
}
