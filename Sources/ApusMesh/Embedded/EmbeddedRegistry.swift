import Foundation
import Logging
import Synchronization

/// The registry inside `apusd` (the default): `RegistryStateMachine` behind a mutex, with watchers and a sweeper
/// that expires leases as their TTL passes. Served to sidecars and clients over the control API
/// (`/v1/registry/…`, see `RegistryHTTPClient`).
public final class EmbeddedRegistry: SnapshottingServiceRegistry {
    private struct State {
        var machine: RegistryStateMachine
        var watchers: [String: [UInt64: AsyncThrowingStream<ServiceSnapshot, any Error>.Continuation]] = [:]
        var nextWatcher: UInt64 = 0
        /// Set once `run` ended (the daemon stops): new watches get the current snapshot and end.
        var closed = false
    }

    private let state: Mutex<State>
    private let now: @Sendable () -> ContinuousClock.Instant
    private let logger: Logger
    private let metrics = RegistryMetrics()

    /// - Parameters:
    ///   - now: the clock (tests pass a manual one).
    ///   - initialIndex: the first change index (default: wall-clock milliseconds, so indexes grow across restarts).
    public init(
        now: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now },
        initialIndex: UInt64 = UInt64(Date().timeIntervalSince1970 * 1000),
        logger: Logger
    ) {
        let prefix = String(UInt32.random(in: 0x1000_0000...UInt32.max), radix: 16)
        self.state = Mutex(State(machine: RegistryStateMachine(initialIndex: initialIndex, leasePrefix: prefix)))
        self.now = now
        self.logger = logger
    }

    /// Applies an operation to the machine, expiring what is due first, then tells watchers and metrics.
    private func mutate<T>(_ body: (inout RegistryStateMachine, ContinuousClock.Instant) throws(RegistryError) -> (T, [RegistryStateMachine.Change]))
        throws(RegistryError) -> T
    {
        let time = now()
        let result: Result<(T, [RegistryStateMachine.Change]), RegistryError> = state.withLock { state in
            var changes = state.machine.expire(now: time)
            do throws(RegistryError) {
                let (value, more) = try body(&state.machine, time)
                changes += more
                notify(&state, changes, time)
                return .success((value, changes))
            } catch {
                notify(&state, changes, time)
                return .failure(error)
            }
        }
        switch result {
        case .success(let (value, _)): return value
        case .failure(let error): throw error
        }
    }

    private func notify(_ state: inout State, _ changes: [RegistryStateMachine.Change], _ time: ContinuousClock.Instant) {
        guard !changes.isEmpty else { return }
        for service in Set(changes.map(\.service)) {
            metrics.setEndpoints(service: service, count: state.machine.endpointCount(of: service))
            if let watchers = state.watchers[service], !watchers.isEmpty {
                let snapshot = state.machine.snapshot(of: service, now: time)
                for continuation in watchers.values { continuation.yield(snapshot) }
            }
        }
        for change in changes {
            metrics.record(change)
            switch change {
            case .registered(let service, let id, let replaced):
                logger.debug("registered", metadata: ["service": "\(service)", "endpoint": "\(id)", "replaced": "\(replaced)"])
            case .healthChanged(let service, let id, let healthy):
                logger.info("endpoint health changed", metadata: ["service": "\(service)", "endpoint": "\(id)", "healthy": "\(healthy)"])
            case .deregistered(let service, let id):
                logger.debug("deregistered", metadata: ["service": "\(service)", "endpoint": "\(id)"])
            case .expired(let service, let id):
                logger.info("registration expired", metadata: ["service": "\(service)", "endpoint": "\(id)"])
            }
        }
    }

    public func register(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int) async throws -> RegistrationLease {
        try mutate { machine, time throws(RegistryError) in
            let (lease, change) = try machine.register(service: service, endpoint: endpoint, ttlSeconds: ttlSeconds, now: time)
            return (lease, [change])
        }
    }

    public func heartbeat(_ lease: RegistrationLease) async throws {
        _ = try renew(leaseID: lease.leaseID)
    }

    /// Heartbeat by lease id alone (the API's `POST /v1/registry/leases/{lease}/heartbeat`).
    public func renew(leaseID: String) throws(RegistryError) -> RegistrationLease {
        try mutate { machine, time throws(RegistryError) in (try machine.heartbeat(leaseID: leaseID, now: time), []) }
    }

    public func setHealth(_ lease: RegistrationLease, healthy: Bool) async throws {
        try setHealth(leaseID: lease.leaseID, healthy: healthy)
    }

    public func setHealth(leaseID: String, healthy: Bool) throws(RegistryError) {
        try mutate { machine, time throws(RegistryError) in
            let change = try machine.setHealth(leaseID: leaseID, healthy: healthy, now: time)
            return ((), change.map { [$0] } ?? [])
        }
    }

    public func deregister(_ lease: RegistrationLease) async throws {
        try deregister(service: lease.service, endpointID: lease.endpointID, leaseID: lease.leaseID)
    }

    public func deregister(service: String, endpointID: String, leaseID: String?) throws(RegistryError) {
        try mutate { machine, _ throws(RegistryError) in
            ((), [try machine.deregister(service: service, endpointID: endpointID, leaseID: leaseID)])
        }
    }

    public func resolve(_ service: String) async throws -> [ServiceEndpoint] {
        try mutate { machine, _ throws(RegistryError) in (machine.endpoints(of: service), []) }
    }

    public func services() async throws -> [ServiceRecord] {
        try await snapshots().map(\.record)
    }

    public func snapshot(_ service: String) async throws -> ServiceSnapshot {
        try mutate { machine, time throws(RegistryError) in (machine.snapshot(of: service, now: time), []) }
    }

    public func snapshots() async throws -> [ServiceSnapshot] {
        try mutate { machine, time throws(RegistryError) in (machine.serviceNames.map { machine.snapshot(of: $0, now: time) }, []) }
    }

    public func snapshotChanges(_ service: String) -> AsyncThrowingStream<ServiceSnapshot, any Error> {
        let (stream, continuation) = AsyncThrowingStream<ServiceSnapshot, any Error>.makeStream(bufferingPolicy: .bufferingNewest(16))
        let time = now()
        let id = state.withLock { state -> UInt64 in
            defer { state.nextWatcher += 1 }
            return state.nextWatcher
        }
        // Set before the continuation is shared: whoever ends the stream (its reader, `run`) runs this handler, and
        // it takes the lock — so no continuation is ever finished, or released, while the lock is held.
        continuation.onTermination = { [weak self] _ in
            let removed = self?.state.withLock { state in
                defer { if state.watchers[service]?.isEmpty == true { state.watchers[service] = nil } }
                return state.watchers[service]?.removeValue(forKey: id)
            }
            _ = removed  // released here, outside the lock
        }
        let registered = state.withLock { state -> (snapshot: ServiceSnapshot, registered: Bool) in
            notify(&state, state.machine.expire(now: time), time)
            let snapshot = state.machine.snapshot(of: service, now: time)
            guard !state.closed else { return (snapshot, false) }
            state.watchers[service, default: [:]][id] = continuation
            continuation.yield(snapshot)
            return (snapshot, true)
        }
        if !registered.registered {
            // The daemon stops: the current snapshot, then the end.
            continuation.yield(registered.snapshot)
            continuation.finish()
        }
        return stream
    }

    public func watch(_ service: String) -> AsyncThrowingStream<[ServiceEndpoint], any Error> {
        let changes = snapshotChanges(service)
        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    for try await snapshot in changes { continuation.yield(snapshot.endpoints.map(\.endpoint)) }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Expires what is due now; returns how many entries went.
    @discardableResult
    public func sweep() -> Int {
        let time = now()
        return state.withLock { state in
            let gone = state.machine.expire(now: time)
            notify(&state, gone, time)
            return gone.count
        }
    }

    /// Expires leases as they run out (checking at least every `interval`), until the task is cancelled; then ends
    /// every watch.
    public func run(interval: Duration = .milliseconds(100)) async {
        while !Task.isCancelled {
            sweep()
            try? await Task.sleep(for: interval)
        }
        // Taken out under the lock, finished outside it: finishing runs each stream's `onTermination`, which takes
        // the lock again (finishing inside it crashed apusd at SIGTERM with a registry watch open).
        let open = state.withLock { state in
            state.closed = true
            defer { state.watchers = [:] }
            return state.watchers
        }
        for watchers in open.values { for continuation in watchers.values { continuation.finish() } }
    }
}
