import ApusCore
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// A connection to an instance that can wait in a per-instance idle list between calls.
protocol PooledInstanceConnection: AnyObject {
    var channel: any Channel { get }
    var instanceID: String { get }
    var endpoint: InstanceEndpoint { get }
    /// Set once the pool watches the channel's closing (so it is watched once).
    var watchedWhileIdle: Bool { get set }
}

/// Idle connections per instance for one event loop's pool. A connection that closes while idle leaves its list,
/// and an emptied list goes away, so stopped instances leave nothing behind.
final class IdleConnections<Connection: PooledInstanceConnection> {
    private var idle: [String: [Connection]] = [:]
    private let maxPerInstance: Int

    init(maxPerInstance: Int) {
        self.maxPerInstance = maxPerInstance
    }

    /// An open idle connection to the instance on `port` that `fits`; others met on the way are closed.
    func take(instanceID: String, endpoint: InstanceEndpoint, fits: (Connection) -> Bool = { _ in true }) -> Connection? {
        while let connection = idle[instanceID]?.popLast() {
            if idle[instanceID]?.isEmpty == true { idle[instanceID] = nil }
            if connection.channel.isActive, connection.endpoint == endpoint, fits(connection) { return connection }
            connection.channel.close(promise: nil)
        }
        return nil
    }

    /// Keeps the connection for a later call, or closes it when it is not reusable or the list is full.
    func put(_ connection: Connection) {
        guard connection.channel.isActive, (idle[connection.instanceID]?.count ?? 0) < maxPerInstance else {
            connection.channel.close(promise: nil)
            return
        }
        idle[connection.instanceID, default: []].append(connection)
        if !connection.watchedWhileIdle {
            connection.watchedWhileIdle = true
            connection.channel.closeFuture.assumeIsolated().whenComplete { [weak self, weak connection] _ in
                guard let self, let connection else { return }
                self.forget(connection)
            }
        }
    }

    private func forget(_ connection: Connection) {
        guard var list = idle[connection.instanceID] else { return }
        list.removeAll { $0 === connection }
        idle[connection.instanceID] = list.isEmpty ? nil : list
    }

    func closeAll() {
        for list in idle.values { for connection in list { connection.channel.close(promise: nil) } }
        idle.removeAll()
    }
}

/// A TCP connection from `loop` to an instance (on loopback, or at its address in its own network namespace), made
/// the way every instance pool makes one (no Nagle delay, 2 s connect timeout); `configure` sets up its pipeline.
func connectToInstance(
    endpoint: InstanceEndpoint, on loop: any EventLoop, configure: @escaping @Sendable (any Channel) throws -> Void
) -> EventLoopFuture<any Channel> {
    var raw = sockaddr_in()
    raw.sin_family = sa_family_t(AF_INET)
    raw.sin_port = UInt16(endpoint.port).bigEndian
    raw.sin_addr.s_addr = endpoint.address.bigEndian
    let address = SocketAddress(raw, host: endpoint.host)
    return ClientBootstrap(group: loop)
        .channelOption(.socketOption(.tcp_nodelay), value: 1)
        .connectTimeout(.seconds(2))
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try configure(channel) }
        }
        .connect(to: address)
}
