import ApusCore
import NIOCore

/// Idle and message-head timeouts for a client connection SwiftNIO serves (Thrift, HTTP/2, TLS, the `nio` HTTP/1.1
/// engine, connections the reactor handed over). First in the pipeline, it sees every read and write. Once a
/// second it asks the protocol handler behind it whether work is in progress (a call, a stream, an exchange):
/// * idle — nothing read or written for `idleTimeout` and no work in progress: the connection closes;
/// * head — bytes read while no work was in progress, and still none after `headTimeout` (a message that never
///   completes: slowloris, a partial Thrift frame held open): the connection closes. Not for HTTP/2, where a
///   client may ping an idle connection.
final class ConnectionTimeouts: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    typealias InboundOut = NIOAny
    typealias OutboundIn = NIOAny
    typealias OutboundOut = NIOAny

    /// The protocol handler whose work counts, found once it is in the pipeline.
    private enum ProtocolHandler {
        case thrift(ThriftEdgeConnection)
        case http1(GatewayConnectionHandler)
        case http2(HTTP2ConnectionGuard)
    }
    private var protocolHandler: ProtocolHandler?

    /// Whether the connection has work in progress, from the protocol handler in its pipeline.
    private func busy(_ pipeline: ChannelPipeline.SynchronousOperations) -> (busy: Bool, headApplies: Bool) {
        if protocolHandler == nil {
            if let thrift = try? pipeline.handler(type: ThriftEdgeConnection.self) {
                protocolHandler = .thrift(thrift)
            } else if let http1 = try? pipeline.handler(type: GatewayConnectionHandler.self) {
                protocolHandler = .http1(http1)
            } else if let http2 = try? pipeline.handler(type: HTTP2ConnectionGuard.self) {
                protocolHandler = .http2(http2)
            }
        }
        switch protocolHandler {
        case .thrift(let thrift): return (thrift.hasCallsInProgress, true)
        case .http1(let http1): return (http1.hasExchangeInProgress, true)
        case .http2(let http2): return (http2.hasStreamsOpen, false)
        case nil: return (false, true)  // still deciding what the connection speaks
        }
    }

    private let idleTimeout: TimeAmount
    private let headTimeout: TimeAmount
    /// Reads and writes only raise flags (no clock read on the data path); the once-a-second check turns them into
    /// times, so both timeouts are exact to a second.
    private var active = false
    private var lastActivity = NIODeadline.now()
    /// Bytes arrived while no work was in progress, and no answer went out since.
    private var headPending = false
    /// When the check first saw `headPending`.
    private var headStarted: NIODeadline?
    private var tick: RepeatedTask?

    init(idleTimeout: TimeAmount, headTimeout: TimeAmount) {
        self.idleTimeout = idleTimeout
        self.headTimeout = headTimeout
    }

    convenience init(_ configuration: GatewayServer.Configuration) {
        self.init(idleTimeout: .nanoseconds(configuration.idleTimeout.nanoseconds),
                  headTimeout: .nanoseconds(configuration.headTimeout.nanoseconds))
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        tick = context.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
            let (handler, context) = loopBound.value
            handler.check(context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        tick?.cancel()
        tick = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        tick?.cancel()
        tick = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        active = true
        if !headPending, !busy(context.pipeline.syncOperations).busy { headPending = true }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        active = true
        headPending = false  // an answer went out: the message before it was whole
        context.write(data, promise: promise)
    }

    private func check(context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        let now = NIODeadline.now()
        if active {
            active = false
            lastActivity = now
        }
        let (busy, headApplies) = busy(context.pipeline.syncOperations)
        if busy {
            headPending = false
            headStarted = nil
            return
        }
        if !headPending {
            headStarted = nil
        } else if headStarted == nil {
            headStarted = now
        }
        if headApplies, let headStarted, now - headStarted > headTimeout {
            context.close(promise: nil)
        } else if now - lastActivity > idleTimeout {
            context.close(promise: nil)
        }
    }
}
