import Logging
import NIOCore
import NIOPosix

/// Thrift listeners. The per-upstream `thrift_port` relays call by call (`ThriftCallRelay`); the inbound side of a
/// Thrift app is a raw TCP relay (`TCPRelayClientSide`: bytes pass through unchanged both ways, each connection
/// counts against the inbound limits).
enum TCPRelay {
    /// The per-upstream Thrift listener: call by call (`ThriftCallRelay`).
    static func bindThriftCalls(group: any EventLoopGroup, host: String, port: Int, cluster: UpstreamCluster, shared: SidecarShared) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ThriftCallRelay(cluster: cluster, shared: shared))
                }
            }
            .bind(host: host, port: port)
            .get()
    }

    /// The inbound port of a Thrift app: raw TCP to the app.
    static func bindInbound(group: any EventLoopGroup, host: String, port: Int, cluster: UpstreamCluster, shared: SidecarShared) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(TCPRelayClientSide(cluster: cluster, shared: shared))
                }
            }
            .bind(host: host, port: port)
            .get()
    }
}

/// An accepted connection: passes the inbound limits (the caller is its source address), picks the endpoint,
/// connects (a failed connect is retried within the policy), then copies bytes both ways.
final class TCPRelayClientSide: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let cluster: UpstreamCluster
    private let shared: SidecarShared
    private var context: ChannelHandlerContext?
    private var upstream: (any Channel)?
    private var tried: [String] = []
    /// The endpoint of the current connection attempt or relay.
    private var endpointID: String?
    private var startedAt: Nanos = 0
    private var admitted = false
    private var admittedInbound = false
    private var closed = false
    private var receivedFromUpstream = false

    init(cluster: UpstreamCluster, shared: SidecarShared) {
        self.cluster = cluster
        self.shared = shared
    }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        startedAt = SidecarClock.now()
        let caller = context.channel.remoteAddress?.ipAddress ?? "unknown"
        guard shared.limits.admit(caller: caller, now: startedAt) == .admitted else {
            context.close(promise: nil)
            return
        }
        admittedInbound = true
        if let refusal = cluster.admit(now: startedAt) {
            shared.logger.info("thrift connection refused", metadata: ["upstream": "\(cluster.name)", "reason": "\(refusal.message)"])
            context.close(promise: nil)
            return
        }
        admitted = true
        connect(context: context)
        context.fireChannelActive()
    }

    private func connect(context: ChannelHandlerContext) {
        let now = SidecarClock.now()
        guard let chosen = cluster.pick(hashKey: nil, tried: tried, now: now) else {
            finish(.failure, code: 503)
            context.close(promise: nil)
            return
        }
        tried.append(chosen.id)
        endpointID = chosen.id
        let client = NIOLoopBound(self, eventLoop: context.eventLoop)
        ClientBootstrap(group: context.eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(HTTP1UpstreamPool.connectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(TCPRelayUpstreamSide(client: client.value))
                }
            }
            .connect(host: chosen.address, port: chosen.port)
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    if closed {
                        channel.close(promise: nil)
                        return
                    }
                    upstream = channel
                    context.channel.setOption(ChannelOptions.autoRead, value: true).whenFailure { _ in }
                    context.read()
                case .failure(let error):
                    cluster.attemptEnded(chosen.id, .failure, now: SidecarClock.now())
                    endpointID = nil
                    if !closed, tried.count < cluster.policy.attempts, cluster.tryRetry(now: SidecarClock.now()) {
                        connect(context: context)
                    } else {
                        shared.logger.warning("thrift connect failed", metadata: ["upstream": "\(cluster.name)", "error": "\(error)"])
                        finish(.failure, code: 503)
                        context.close(promise: nil)
                    }
                }
            }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        upstream?.write(data, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        upstream?.flush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        upstream?.setOption(ChannelOptions.autoRead, value: context.channel.isWritable).whenFailure { _ in }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        upstream?.close(promise: nil)
        finish(receivedFromUpstream ? .success : .abandoned, code: 200)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    fileprivate func fromUpstream(_ data: NIOAny) {
        receivedFromUpstream = true
        context?.write(data, promise: nil)
    }

    fileprivate func upstreamFlush() { context?.flush() }

    fileprivate func upstreamWritability(_ writable: Bool) {
        context?.channel.setOption(ChannelOptions.autoRead, value: writable).whenFailure { _ in }
    }

    fileprivate func upstreamClosed() {
        if let endpointID {
            cluster.attemptEnded(endpointID, receivedFromUpstream ? .success : .failure, now: SidecarClock.now())
            self.endpointID = nil
        }
        context?.close(promise: nil)
    }

    private func finish(_ outcome: AttemptOutcome, code: Int) {
        if let endpointID {
            cluster.attemptEnded(endpointID, outcome, now: SidecarClock.now())
            self.endpointID = nil
        }
        if admitted {
            admitted = false
            cluster.requestEnded(outcome, code: code, startedAt: startedAt, now: SidecarClock.now())
        }
        if admittedInbound {
            admittedInbound = false
            shared.limits.release()
        }
    }
}

final class TCPRelayUpstreamSide: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let client: TCPRelayClientSide

    init(client: TCPRelayClientSide) {
        self.client = client
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { client.fromUpstream(data) }
    func channelReadComplete(context: ChannelHandlerContext) { client.upstreamFlush() }
    func channelWritabilityChanged(context: ChannelHandlerContext) { client.upstreamWritability(context.channel.isWritable) }
    func channelInactive(context: ChannelHandlerContext) { client.upstreamClosed() }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}
