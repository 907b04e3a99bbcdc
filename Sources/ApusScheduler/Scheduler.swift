import ApusCore
import ApusRuntime
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Owns every function version's `InstancePool`. A swift-service-lifecycle `Service`: its `run()` drives the pools'
/// housekeeping and, on graceful shutdown, stops every instance (after the gateway in front has drained).
public final class Scheduler: Service {
    public struct Configuration: Sendable {
        public var queueLength: Int
        public var idleTimeout: Duration
        public var stopGrace: Duration
        public var tickInterval: Duration
        /// Ready instances per version above which each gateway worker keeps to its consistent-hash shard of this
        /// many instances (0: no sharding).
        public var shardSize: Int

        public init(queueLength: Int = 1000, idleTimeout: Duration = .seconds(60), stopGrace: Duration = .seconds(5),
                    tickInterval: Duration = .milliseconds(250), shardSize: Int = 0) {
            self.shardSize = shardSize
            self.queueLength = queueLength
            self.idleTimeout = idleTimeout
            self.stopGrace = stopGrace
            self.tickInterval = tickInterval
        }
    }

    private struct PoolKey: Hashable {
        var function: String
        var version: Int
    }

    public let configuration: Configuration
    public let catalog: FunctionCatalog
    private let launcher: any InstanceLauncher
    private let codeDirectory: @Sendable (FunctionVersion) throws(ApusError) -> URL
    private let pools = Mutex<[PoolKey: InstancePool]>([:])
    private let logger: Logger
    /// Time for every pool and the housekeeping loop (`SystemClock`; a `ManualClock` in unit tests).
    public let clock: any SchedulingClock

    public init(
        configuration: Configuration, catalog: FunctionCatalog, launcher: any InstanceLauncher,
        codeDirectory: @escaping @Sendable (FunctionVersion) throws(ApusError) -> URL, logger: Logger,
        clock: any SchedulingClock = SystemClock()
    ) {
        self.clock = clock
        self.configuration = configuration
        self.catalog = catalog
        self.launcher = launcher
        self.codeDirectory = codeDirectory
        self.logger = logger
    }

    private func poolConfiguration(_ version: FunctionVersion, active: Bool) -> InstancePoolStateMachine.Configuration {
        let manifest = version.manifest
        let bounds = scaleBounds(of: version)
        return .init(
            concurrency: manifest.concurrency,
            minInstances: active ? bounds.min : 0,
            maxInstances: bounds.max,
            queueLength: configuration.queueLength,
            idleTimeout: configuration.idleTimeout,
            shedding: manifest.shedding.map { .init(target: $0.target, interval: $0.interval) },
            shardSize: configuration.shardSize)
    }

    /// Why an instance failed its callers, when the runtime knows (an OOM kill); nil otherwise. An instance with a
    /// known failure is dead even if its exit has not been seen yet: it is taken out of service at once, so the
    /// next request does not reach its closing socket.
    public func instanceFailureReason(_ instanceID: String) -> String? {
        guard let reason = launcher.failureReason(instanceID: instanceID) else { return nil }
        for pool in allPools where pool.takeOutOfService(instanceID: instanceID) { break }
        return reason
    }

    /// Whether the instance's process still runs: one that failed a call while it runs may be about to end, and
    /// its exit (an OOM kill) tells why.
    public func instanceIsRunning(_ instanceID: String) -> Bool {
        launcher.isRunning(instanceID: instanceID)
    }

    /// The version's instance bounds: its manifest's `scale`, under the function's `apus scale` override if any.
    public func scaleBounds(of version: FunctionVersion) -> (min: Int, max: Int) {
        let override = catalog.entry(version.function)?.record.scale
        return override?.apply(to: version.manifest.scale) ?? (version.manifest.scale.min, version.manifest.scale.max)
    }

    func isActive(_ version: FunctionVersion) -> Bool {
        catalog.entry(version.function)?.record.release.activeVersions.contains(version.number) ?? false
    }

    /// The pool serving `version`, created on first use.
    public func pool(for version: FunctionVersion) -> InstancePool {
        let key = PoolKey(function: version.function, version: version.number)
        return pools.withLock { pools in
            if let pool = pools[key] { return pool }
            let pool = InstancePool(
                version: version, configuration: poolConfiguration(version, active: isActive(version)),
                launcher: launcher, codeDirectory: codeDirectory, stopGrace: configuration.stopGrace, logger: logger,
                clock: clock)
            pools[key] = pool
            return pool
        }
    }

    /// Brings pools in line with the catalog after a deploy or release: released versions keep `scale.min` warm,
    /// versions out of the release drop to zero as they go idle.
    public func reconcile(function: String) {
        guard let entry = catalog.entry(function) else { return }
        let active = Set(entry.record.release.activeVersions)
        for number in active {
            if let version = entry.versions[number] { pool(for: version).ensureMinimum() }
        }
        let existing = pools.withLock { $0.filter { $0.key.function == function }.map(\.value) }
        for pool in existing {
            pool.reconfigure(poolConfiguration(pool.version, active: active.contains(pool.version.number)))
        }
    }

    /// Stops and forgets every instance of a deleted function.
    public func remove(function: String) async {
        let removed = pools.withLock { pools in
            let keys = pools.keys.filter { $0.function == function }
            return keys.compactMap { pools.removeValue(forKey: $0) }
        }
        for pool in removed {
            await pool.close(reason: ApusError(.notFound, "function \(function) was deleted"))
        }
    }

    /// Every pool that exists now.
    var allPools: [InstancePool] {
        pools.withLock { Array($0.values) }
    }

    public func instances(of function: String) -> [InstancePool.InstanceInfo] {
        let matching = pools.withLock { $0.filter { $0.key.function == function }.sorted { $0.key.version < $1.key.version }.map(\.value) }
        return matching.flatMap { $0.instances() }
    }

    /// What the autoscaler last decided for each of the function's versions, as shown by status displays.
    public struct ScalerStatus: Sendable, Codable {
        public var version: Int
        public var desired: Int
        public var wanted: Int
        public var ready: Int
        public var stableConcurrency: Double
        public var panicConcurrency: Double
        public var panicking: Bool
        public var limitedBy: String?
        public var ageSeconds: Double
        /// Seconds the version was short of capacity, idle, or right-sized, as judged after the fact.
        public var score: ScalerScore
    }

    public func scalerStatus(of function: String) -> [ScalerStatus] {
        let matching = pools.withLock { $0.filter { $0.key.function == function }.sorted { $0.key.version < $1.key.version }.map(\.value) }
        let now = clock.now
        return matching.compactMap { pool in
            pool.lastDecision.map { decision in
                ScalerStatus(version: pool.version.number, desired: decision.desired, wanted: decision.wanted, ready: decision.ready,
                             stableConcurrency: decision.stableConcurrency, panicConcurrency: decision.panicConcurrency,
                             panicking: decision.panicking, limitedBy: decision.limitedBy, ageSeconds: (now - decision.at).seconds,
                             score: pool.score)
            }
        }
    }

    /// Brings every pool's gauges up to date (before a metrics scrape).
    public func refreshMetrics() {
        for pool in allPools { pool.refreshGauges() }
    }

    public func queueDepth(of function: String) -> Int {
        pools.withLock { $0.filter { $0.key.function == function }.map(\.value) }.reduce(0) { $0 + $1.queueDepth }
    }

    public func run() async throws {
        for function in catalog.functionNames { reconcile(function: function) }
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                let all = self.pools.withLock { Array($0.values) }
                for pool in all { pool.tick() }
                try? await self.clock.sleep(for: self.configuration.tickInterval)
            }
        }
        logger.info("stopping all instances")
        let all = pools.withLock { Array($0.values) }
        await withTaskGroup(of: Void.self) { group in
            for pool in all {
                group.addTask { await pool.close(reason: ApusError(.unavailable, "the platform is shutting down")) }
            }
        }
        await launcher.shutdown()
        logger.info("all instances stopped")
    }
}
