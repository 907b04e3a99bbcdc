import NIOCore
import NIOHTTP2
import NIOPosix

/// One multiplexed HTTP/2 connection per endpoint (`address:port`) from one event loop, opened on first use.
final class HTTP2UpstreamPool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private var connections: [String: HTTP2UpstreamConnection] = [:]

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    /// Opens a stream to the endpoint (connecting first when needed); `initializer` runs on the stream channel.
    func openStream(
        key: String, host: String, port: Int,
        initializer: @escaping (any Channel) throws -> Void,
        completion: @escaping (Result<any Channel, HTTP2UpstreamError>) -> Void
    ) {
        let connection: HTTP2UpstreamConnection
        if let existing = connections[key], !existing.isClosed {
            connection = existing
        } else {
            connection = HTTP2UpstreamConnection(key: key)
            connections[key] = connection
            connect(connection, host: host, port: port)
        }
        connection.openStream(initializer: initializer, completion: completion)
    }

    private func connect(_ connection: HTTP2UpstreamConnection, host: String, port: Int) {
        var settings = NIOHTTP2Handler.ConnectionConfiguration()
        settings.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 1 << 12),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 1 << 16),
        ]
        settings.targetWindowSize = 1 << 22
        settings.headerBlockValidation = .disabled
        settings.contentLengthValidation = .disabled
        let connectionSettings = settings
        let bound = NIOLoopBound(connection, eventLoop: eventLoop)
        let pool = NIOLoopBound(self, eventLoop: eventLoop)
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(HTTP1UpstreamPool.connectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let multiplexer = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                        mode: .client, connectionConfiguration: connectionSettings, streamConfiguration: .init()
                    ) { stream in
                        stream.close()  // endpoints do not push
                    }
                    try channel.pipeline.syncOperations.addHandler(HTTP2ConnectionWatcher(bound.value))
                    bound.value.multiplexer = multiplexer
                    channel.closeFuture.assumeIsolated().whenComplete { _ in pool.value.forget(bound.value) }
                }
            }
            .connect(host: host, port: port)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    bound.value.connected(channel)
                case .failure(let error):
                    bound.value.failed(.connectFailed(describeConnectError(error)))
                    pool.value.forget(bound.value)
                }
            }
    }

    fileprivate func forget(_ connection: HTTP2UpstreamConnection) {
        if connections[connection.key] === connection { connections[connection.key] = nil }
    }

    func closeAll() {
        for connection in connections.values { connection.close() }
        connections.removeAll()
    }
}

enum HTTP2UpstreamError: Error, CustomStringConvertible {
    /// Nobody answered: nothing was sent.
    case connectFailed(String)
    case streamFailed(String)

    var description: String {
        switch self {
        case .connectFailed(let reason): "connect failed: \(reason)"
        case .streamFailed(let reason): "stream failed: \(reason)"
        }
    }
}

final class HTTP2UpstreamConnection {
    let key: String
    fileprivate var multiplexer: NIOHTTP2Handler.StreamMultiplexer?
    private var channel: (any Channel)?
    private var pending: [(initializer: (any Channel) throws -> Void, completion: (Result<any Channel, HTTP2UpstreamError>) -> Void)] = []
    private(set) var isClosed = false

    init(key: String) {
        self.key = key
    }

    func openStream(initializer: @escaping (any Channel) throws -> Void, completion: @escaping (Result<any Channel, HTTP2UpstreamError>) -> Void) {
        guard let channel, let multiplexer else {
            pending.append((initializer, completion))
            return
        }
        let loop = channel.eventLoop
        let promise = loop.makePromise(of: (any Channel).self)
        promise.futureResult.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success(let stream): completion(.success(stream))
            case .failure(let error):
                isClosed = true
                completion(.failure(.streamFailed("\(error)")))
            }
        }
        let boundInitializer = NIOLoopBound(initializer, eventLoop: loop)
        multiplexer.createStreamChannel(promise: promise) { stream in
            loop.makeCompletedFuture { try boundInitializer.value(stream) }
        }
    }

    fileprivate func connected(_ channel: any Channel) {
        self.channel = channel
        let waiting = pending
        pending = []
        for entry in waiting { openStream(initializer: entry.initializer, completion: entry.completion) }
    }

    fileprivate func failed(_ error: HTTP2UpstreamError) {
        isClosed = true
        let waiting = pending
        pending = []
        for entry in waiting { entry.completion(.failure(error)) }
    }

    fileprivate func closed() {
        isClosed = true
        channel = nil
        multiplexer = nil
        failed(.connectFailed("connection closed"))
    }

    fileprivate func draining() { isClosed = true }

    func close() {
        channel?.close(promise: nil)
    }
}

private final class HTTP2ConnectionWatcher: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame

    private let connection: HTTP2UpstreamConnection

    init(_ connection: HTTP2UpstreamConnection) {
        self.connection = connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .goAway = unwrapInboundIn(data).payload { connection.draining() }
        context.fireChannelRead(data)
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection.closed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
