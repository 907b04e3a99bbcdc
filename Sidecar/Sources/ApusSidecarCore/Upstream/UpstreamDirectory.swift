import ApusMesh
import Logging
import Synchronization

/// The upstreams the sidecar knows: each resolved from the registry on first use and kept current by a watch.
public final class UpstreamDirectory: Sendable {
    private struct State {
        var clusters: [String: UpstreamCluster] = [:]
        var watches: [String: Task<Void, Never>] = [:]
        var config: SidecarConfig
    }

    private let state: Mutex<State>
    public let registry: any ServiceRegistry
    private let logger: Logger
    /// How long a request waits for the registry's first answer about a new upstream.
    static let resolveTimeout: Duration = .seconds(3)
    static let maxUpstreams = 4096

    public init(registry: any ServiceRegistry, config: SidecarConfig, logger: Logger) {
        self.registry = registry
        self.logger = logger
        self.state = Mutex(State(config: config))
    }

    /// The upstream named `name`, created (and its watch started) on first use; nil past the upstream cap.
    public func cluster(_ name: String) -> UpstreamCluster? {
        let (cluster, isNew) = state.withLock { state -> (UpstreamCluster?, Bool) in
            if let existing = state.clusters[name] { return (existing, false) }
            guard state.clusters.count < Self.maxUpstreams else { return (nil, false) }
            let made = UpstreamCluster(name: name, policy: state.config.policy(for: name), logger: logger)
            state.clusters[name] = made
            return (made, true)
        }
        if isNew, let cluster { startWatch(cluster) }
        return cluster
    }

    /// Creates every upstream named in the config up front (their Thrift ports need them, and the first request
    /// should not wait for the registry).
    public func preload() {
        let names = state.withLock { Array($0.config.upstreams.keys) }
        for name in names { _ = cluster(name) }
    }

    public var all: [UpstreamCluster] {
        state.withLock { $0.clusters.values.sorted { $0.name < $1.name } }
    }

    /// A reloaded config: new policies for every upstream.
    public func reload(_ config: SidecarConfig) {
        let clusters = state.withLock { state -> [UpstreamCluster] in
            state.config = config
            return Array(state.clusters.values)
        }
        for cluster in clusters { cluster.update(policy: config.policy(for: cluster.name)) }
        preload()
    }

    private func startWatch(_ cluster: UpstreamCluster) {
        let registry = self.registry
        let logger = self.logger
        let name = cluster.name
        let timeout = Task {
            try? await Task.sleep(for: Self.resolveTimeout)
            if !Task.isCancelled { cluster.resolutionFailed() }
        }
        let task = Task {
            var delay = Duration.milliseconds(200)
            while !Task.isCancelled {
                do {
                    for try await endpoints in registry.watch(name) {
                        timeout.cancel()
                        cluster.update(endpoints: endpoints)
                        delay = .milliseconds(200)
                    }
                    if Task.isCancelled { return }
                } catch {
                    logger.warning("registry watch failed; retrying", metadata: ["upstream": "\(name)", "error": "\(error)"])
                }
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
            }
        }
        state.withLock { $0.watches[name] = task }
    }

    public func shutdown() {
        let tasks = state.withLock { state -> [Task<Void, Never>] in
            defer { state.watches = [:] }
            return Array(state.watches.values)
        }
        for task in tasks { task.cancel() }
    }
}
