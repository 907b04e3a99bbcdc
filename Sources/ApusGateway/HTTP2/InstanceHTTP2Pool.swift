import NIOCore
import NIOHTTP2
import NIOPosix

/// Why a stream to an instance could not be opened.
enum InstanceStreamError: Error, CustomStringConvertible {
    /// The TCP connection could not be made: nobody listens on the instance's port.
    case connectFailed(any Error)
    /// The connection exists or existed but the stream could not be opened (GOAWAY, closed, refused).
    case streamFailed(any Error)

    var description: String {
        switch self {
        case .connectFailed(let error): "connect failed: \(error)"
        case .streamFailed(let error): "stream failed: \(error)"
        }
    }
}

/// HTTP/2 connections from one event loop to gRPC instances: one multiplexed connection per instance, opened
/// on first use and reused by every stream after it. Lives on its event loop; all calls happen there.
final class InstanceHTTP2Pool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private let limits: GatewayServer.HTTP2Limits
    private var connections: [String: InstanceHTTP2Connection] = [:]

    init(eventLoop: any EventLoop, limits: GatewayServer.HTTP2Limits) {
        self.eventLoop = eventLoop
        self.limits = limits
    }

    /// Opens a stream to the instance (connecting first when needed) and runs `initializer` on its channel.
    func openStream(
        instanceID: String, port: Int,
        initializer: @escaping (any Channel) -> Void,
        completion: @escaping (Result<any Channel, InstanceStreamError>) -> Void
    ) {
        eventLoop.assertInEventLoop()
        let connection: InstanceHTTP2Connection
        if let existing = connections[instanceID], !existing.isClosed, existing.port == port {
            connection = existing
        } else {
            connection = InstanceHTTP2Connection(instanceID: instanceID, port: port)
            connections[instanceID] = connection
            connect(connection)
        }
        connection.openStream(initializer: initializer, completion: completion)
    }

    private func connect(_ connection: InstanceHTTP2Connection) {
        var connectionConfiguration = NIOHTTP2Handler.ConnectionConfiguration()
        connectionConfiguration.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 1 << 16),
            HTTP2Setting(parameter: .initialWindowSize, value: limits.initialWindowSize),
            HTTP2Setting(parameter: .maxHeaderListSize, value: limits.maxHeaderListSize),
        ]
        connectionConfiguration.targetWindowSize = limits.connectionWindowSize
        // Requests were validated where they entered (the client's connection); responses pass through as sent.
        connectionConfiguration.headerBlockValidation = .disabled
        connectionConfiguration.contentLengthValidation = .disabled
        var stream = NIOHTTP2Handler.StreamConfiguration()
        stream.targetWindowSize = limits.initialWindowSize
        let streamConfiguration = stream
        let connectionSettings = connectionConfiguration
        let loop = eventLoop
        let bound = NIOLoopBound(connection, eventLoop: loop)
        let pool = NIOLoopBound(self, eventLoop: loop)
        connectToInstance(port: connection.port, on: loop) { channel in
            let multiplexer = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                mode: .client, connectionConfiguration: connectionSettings,
                streamConfiguration: streamConfiguration
            ) { stream in
                // Instances never push or open streams towards the gateway.
                stream.close()
            }
            try channel.pipeline.syncOperations.addHandler(InstanceConnectionWatcher(bound.value))
            channel.closeFuture.assumeIsolated().whenComplete { _ in pool.value.forget(bound.value) }
            bound.value.multiplexer = multiplexer
        }
            .assumeIsolated()
            .whenComplete { result in
                let connection = bound.value
                switch result {
                case .success(let channel):
                    connection.connected(channel)
                case .failure(let error):
                    connection.failed(.connectFailed(error))
                    pool.value.forget(connection)
                }
            }
    }

    fileprivate func forget(_ connection: InstanceHTTP2Connection) {
        if connections[connection.instanceID] === connection { connections[connection.instanceID] = nil }
    }

    func closeAll() {
        for connection in connections.values { connection.close() }
        connections.removeAll()
    }
}

/// One HTTP/2 connection to an instance. Streams asked for while it connects wait in `pending`.
final class InstanceHTTP2Connection {
    let instanceID: String
    let port: Int
    fileprivate var multiplexer: NIOHTTP2Handler.StreamMultiplexer?
    private var channel: (any Channel)?
    private var pending: [(initializer: (any Channel) -> Void, completion: (Result<any Channel, InstanceStreamError>) -> Void)] = []
    private(set) var isClosed = false

    init(instanceID: String, port: Int) {
        self.instanceID = instanceID
        self.port = port
    }

    func openStream(initializer: @escaping (any Channel) -> Void, completion: @escaping (Result<any Channel, InstanceStreamError>) -> Void) {
        guard let channel, let multiplexer else {
            pending.append((initializer, completion))
            return
        }
        let promise = channel.eventLoop.makePromise(of: (any Channel).self)
        promise.futureResult.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success(let stream):
                completion(.success(stream))
            case .failure(let error):
                isClosed = true  // the next stream opens a fresh connection
                completion(.failure(.streamFailed(error)))
            }
        }
        let loop = channel.eventLoop
        let boundInitializer = NIOLoopBound(initializer, eventLoop: loop)
        multiplexer.createStreamChannel(promise: promise) { stream in
            loop.makeCompletedFuture { boundInitializer.value(stream) }
        }
    }

    fileprivate func connected(_ channel: any Channel) {
        self.channel = channel
        let waiting = pending
        pending = []
        for entry in waiting { openStream(initializer: entry.initializer, completion: entry.completion) }
    }

    fileprivate func failed(_ error: InstanceStreamError) {
        isClosed = true
        let waiting = pending
        pending = []
        for entry in waiting { entry.completion(.failure(error)) }
    }

    fileprivate func closed() {
        isClosed = true
        channel = nil
        multiplexer = nil
        failed(.streamFailed(ChannelError.ioOnClosedChannel))
    }

    func close() {
        channel?.close(promise: nil)
    }
}

/// Marks the connection closed when its channel goes away (instance stopped, GOAWAY, error).
private final class InstanceConnectionWatcher: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame

    private let connection: InstanceHTTP2Connection

    init(_ connection: InstanceHTTP2Connection) {
        self.connection = connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .goAway = unwrapInboundIn(data).payload { connection.markDraining() }
        context.fireChannelRead(data)
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection.closedByPeer()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

extension InstanceHTTP2Connection {
    /// After GOAWAY no new streams go here; the next one opens a fresh connection.
    fileprivate func markDraining() { isClosed = true }
    fileprivate func closedByPeer() { closed() }
}
