import ApusCore
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
/// on first use and reused by every stream after it. Each connection is `NIOHTTP2Handler` (client mode) with one
/// `InstanceConnectionHandler` behind it and no stream channels: calls write and receive frames through it.
/// Lives on its event loop; all calls happen there.
final class InstanceHTTP2Pool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private let limits: GatewayServer.HTTP2Limits
    private var connections: [String: InstanceHTTP2Connection] = [:]
    /// Client connection flushes held back while an instance connection's read burst is handled.
    let deferredFlushes = DeferredFlushes()

    init(eventLoop: any EventLoop, limits: GatewayServer.HTTP2Limits) {
        self.eventLoop = eventLoop
        self.limits = limits
    }

    /// Hands the instance's connection (connecting first when needed) to `completion`, at once when it is
    /// ready; the caller then starts its stream on it (`InstanceConnectionHandler.startStream`).
    func connection(
        instanceID: String, endpoint: InstanceEndpoint,
        completion: @escaping (Result<InstanceConnectionHandler, InstanceStreamError>) -> Void
    ) {
        eventLoop.assertInEventLoop()
        let connection: InstanceHTTP2Connection
        if let existing = connections[instanceID], !existing.isClosed, existing.endpoint == endpoint {
            connection = existing
        } else {
            connection = InstanceHTTP2Connection(instanceID: instanceID, endpoint: endpoint)
            connections[instanceID] = connection
            connect(connection)
        }
        connection.whenReady(completion)
    }

    private func connect(_ connection: InstanceHTTP2Connection) {
        var connectionConfiguration = NIOHTTP2Handler.ConnectionConfiguration()
        connectionConfiguration.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 1 << 16),
            HTTP2Setting(parameter: .initialWindowSize, value: limits.initialWindowSize),
            HTTP2Setting(parameter: .maxHeaderListSize, value: limits.maxHeaderListSize),
        ]
        // Requests were validated where they entered (the client's connection); responses pass through as sent.
        connectionConfiguration.headerBlockValidation = .disabled
        connectionConfiguration.contentLengthValidation = .disabled
        let connectionSettings = connectionConfiguration
        let streamWindow = limits.initialWindowSize
        let connectionWindow = limits.connectionWindowSize
        let loop = eventLoop
        let bound = NIOLoopBound(connection, eventLoop: loop)
        let pool = NIOLoopBound(self, eventLoop: loop)
        connectToInstance(endpoint: connection.endpoint, on: loop) { channel in
            let handler = InstanceConnectionHandler(
                streamWindow: streamWindow, connectionWindow: connectionWindow, deferredFlushes: pool.value.deferredFlushes)
            let connection = bound.value
            handler.onReady = { handler in connection.ready(handler) }
            handler.onDraining = { connection.draining() }
            handler.onClosed = {
                connection.closed()
                pool.value.forget(connection)
            }
            try channel.pipeline.syncOperations.addHandler(
                NIOHTTP2Handler(mode: .client, connectionConfiguration: connectionSettings))
            try channel.pipeline.syncOperations.addHandler(handler)
        }
            .assumeIsolated()
            .whenFailure { error in
                let connection = bound.value
                connection.failed(.connectFailed(error))
                pool.value.forget(connection)
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

/// One HTTP/2 connection to an instance. Calls asked for while it connects wait in `pending`.
final class InstanceHTTP2Connection {
    let instanceID: String
    let endpoint: InstanceEndpoint
    private var handler: InstanceConnectionHandler?
    private var pending: [(Result<InstanceConnectionHandler, InstanceStreamError>) -> Void] = []
    /// No new streams go here (connect failed, GOAWAY, closed); the next call opens a fresh connection.
    private(set) var isClosed = false

    init(instanceID: String, endpoint: InstanceEndpoint) {
        self.instanceID = instanceID
        self.endpoint = endpoint
    }

    func whenReady(_ completion: @escaping (Result<InstanceConnectionHandler, InstanceStreamError>) -> Void) {
        if let handler {
            completion(.success(handler))
        } else {
            pending.append(completion)
        }
    }

    fileprivate func ready(_ handler: InstanceConnectionHandler) {
        self.handler = handler
        let waiting = pending
        pending = []
        for completion in waiting { completion(.success(handler)) }
    }

    fileprivate func failed(_ error: InstanceStreamError) {
        isClosed = true
        let waiting = pending
        pending = []
        for completion in waiting { completion(.failure(error)) }
    }

    fileprivate func draining() {
        isClosed = true
    }

    fileprivate func closed() {
        isClosed = true
        handler = nil
        failed(.streamFailed(ChannelError.ioOnClosedChannel))
    }

    func close() {
        handler?.close()
    }
}
