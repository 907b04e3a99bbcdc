import NIOCore
import NIOHTTP2
import NIOPosix

/// Sets up the pipelines of the sidecar's HTTP listeners (outbound and inbound): the first bytes pick HTTP/2
/// (connection preface: h2c with prior knowledge, which gRPC clients use) or HTTP/1.1.
enum ProxyPipeline {
    static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    static func configureHTTP2(_ channel: any Channel, shared: SidecarShared, side: ProxySide) throws {
        var connection = NIOHTTP2Handler.ConnectionConfiguration()
        connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 1024),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 16),
        ]
        connection.targetWindowSize = 1 << 22
        let peer = channel.remoteAddress?.ipAddress ?? "unknown"
        let guardHandler = HTTP2DrainGuard(shared: shared)
        _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .server, connectionConfiguration: connection, streamConfiguration: .init()
        ) { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.pipeline.syncOperations.addHandler(HTTP2StreamProxy(shared: shared, side: side, peer: peer))
            }
        }
        try channel.pipeline.syncOperations.addHandler(guardHandler)
    }

    /// Binds an HTTP listener (HTTP/1.1 and HTTP/2) on `host:port`.
    static func bind(group: any EventLoopGroup, host: String, port: Int, shared: SidecarShared, side: ProxySide) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ProtocolDetector(shared: shared, side: side))
                }
            }
            .bind(host: host, port: port)
            .get()
    }
}

/// First handler of a connection: the HTTP/2 preface installs HTTP/2, anything else HTTP/1.1.
final class ProtocolDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let shared: SidecarShared
    private let side: ProxySide
    private var buffered: ByteBuffer?

    init(shared: SidecarShared, side: ProxySide) {
        self.shared = shared
        self.side = side
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil { buffered = incoming } else { buffered!.writeBuffer(&incoming) }
        let bytes = buffered!.readableBytesView
        let compared = min(bytes.count, ProxyPipeline.preface.count)
        let matches = bytes.prefix(compared).elementsEqual(ProxyPipeline.preface.prefix(compared))
        if matches && compared < ProxyPipeline.preface.count { return }
        do {
            if matches {
                try ProxyPipeline.configureHTTP2(context.channel, shared: shared, side: side)
            } else {
                try context.channel.pipeline.syncOperations.addHandler(HTTP1ProxyHandler(shared: shared, side: side))
            }
        } catch {
            context.close(promise: nil)
            return
        }
        let soFar = buffered!
        buffered = nil
        context.fireChannelRead(wrapInboundOut(soFar))
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

/// Counts an HTTP/2 connection's streams; on drain sends GOAWAY and closes once they are done.
final class HTTP2DrainGuard: ChannelDuplexHandler, DrainableConnection, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    private let shared: SidecarShared
    private var context: ChannelHandlerContext?
    private var openStreams = 0
    private var draining = false

    init(shared: SidecarShared) {
        self.shared = shared
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        shared.register(self)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        shared.unregister(self)
        self.context = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is NIOHTTP2StreamCreatedEvent {
            openStreams += 1
        } else if event is StreamClosedEvent {
            openStreams -= 1
            if draining && openStreams <= 0 { context.close(promise: nil) }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        shared.unregister(self)
        context.fireChannelInactive()
    }

    func beginDrain() {
        guard let loop = context?.eventLoop else { return }
        loop.execute { [self] in
            guard let context, !draining else { return }
            draining = true
            let goAway = HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
            context.writeAndFlush(wrapOutboundOut(goAway), promise: nil)
            if openStreams <= 0 { context.close(promise: nil) }
        }
    }
}
