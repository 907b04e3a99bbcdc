import ApusCore
import Synchronization

/// The routing snapshot the gateway reads on every request: each function's release and versions.
/// The control plane replaces an entry after every change it commits to the store.
public final class FunctionCatalog: Sendable {
    public struct Entry: Sendable {
        public var record: FunctionRecord
        public var versions: [Int: FunctionVersion]

        public init(record: FunctionRecord, versions: [FunctionVersion]) {
            self.record = record
            self.versions = Dictionary(uniqueKeysWithValues: versions.map { ($0.number, $0) })
        }

        /// The function's `auth:`: that of its latest version, for every version (pinning an older version that
        /// had none must not skip it).
        public var invocationAuth: FunctionManifest.AuthSettings? {
            versions[record.latestVersion]?.manifest.auth
        }
    }

    private struct State {
        var entries: [String: Entry] = [:]
        /// gRPC service name → the function that serves it.
        var grpcServices: [String: String] = [:]
        /// Thrift service name → function.
        var thriftServices: [String: String] = [:]
        /// Thrift method name → function, for plain (not multiplexed) calls.
        var thriftMethods: [String: String] = [:]
        /// Mesh service name (`mesh.service`) → function.
        var meshServices: [String: String] = [:]
        /// The `auth:` of each function that has one (its latest version's).
        var auth: [String: FunctionManifest.AuthSettings] = [:]
        /// Moves on every update and removal (the mesh publisher polls it).
        var generation: UInt64 = 0

        mutating func forgetNames(of function: String) {
            grpcServices = grpcServices.filter { $0.value != function }
            meshServices = meshServices.filter { $0.value != function }
            auth[function] = nil
            thriftServices = thriftServices.filter { $0.value != function }
            thriftMethods = thriftMethods.filter { $0.value != function }
        }
    }

    private let state = Mutex(State())
    /// Lets the gateway skip the mesh host lookup when no function is in the mesh.
    private let hasMeshServices = Atomic<Bool>(false)
    /// Lets the gateway skip the `auth:` lookup when no function has one.
    private let hasAuth = Atomic<Bool>(false)
    /// `State.generation`, readable without the lock.
    private let changes = Atomic<UInt64>(0)

    /// Moves on every update and removal: a cache of entries is current while this has not moved since it was
    /// filled (read it before reading the entry).
    public var changeCount: UInt64 { changes.load(ordering: .acquiring) }

    public init() {}

    public func update(_ entry: Entry) {
        state.withLock { state in
            let name = entry.record.name
            state.entries[name] = entry
            state.forgetNames(of: name)
            for service in Self.grpcServices(of: entry) { state.grpcServices[service] = name }
            for thrift in Self.servedManifests(of: entry).compactMap(\.thrift) {
                state.thriftServices[thrift.service] = name
                for method in thrift.methods { state.thriftMethods[method] = name }
            }
            for mesh in Self.servedManifests(of: entry).compactMap(\.mesh) { state.meshServices[mesh.service] = name }
            state.auth[name] = entry.invocationAuth
            state.generation += 1
            changes.store(state.generation, ordering: .releasing)
            hasMeshServices.store(!state.meshServices.isEmpty, ordering: .relaxed)
            hasAuth.store(!state.auth.isEmpty, ordering: .relaxed)
        }
    }

    public func remove(_ function: String) {
        state.withLock { state in
            state.entries[function] = nil
            state.forgetNames(of: function)
            state.generation += 1
            changes.store(state.generation, ordering: .releasing)
            hasMeshServices.store(!state.meshServices.isEmpty, ordering: .relaxed)
            hasAuth.store(!state.auth.isEmpty, ordering: .relaxed)
        }
    }

    public func entry(_ function: String) -> Entry? {
        state.withLock { $0.entries[function] }
    }

    /// Who may invoke `function` (its latest version's `auth:`), or nil when anyone may. One atomic load when no
    /// function has `auth:`.
    public func invocationAuth(of function: String) -> FunctionManifest.AuthSettings? {
        guard hasAuth.load(ordering: .relaxed) else { return nil }
        return state.withLock { $0.auth[function] }
    }

    public var functionNames: [String] {
        state.withLock { Array($0.entries.keys) }
    }

    /// Whether any function is in the mesh (one atomic load: the gateway asks before looking at hosts).
    public var anyMeshServices: Bool { hasMeshServices.load(ordering: .relaxed) }

    func meshFunction(_ service: String) -> String? { state.withLock { $0.meshServices[service] } }

    /// The catalog's change counter and mesh services, read together.
    var meshSnapshot: (UInt64, [String: String]) { state.withLock { ($0.generation, $0.meshServices) } }

    /// The function serving a gRPC service (`pkg.Service`), if any.
    public func function(servingGRPCService service: String) -> String? {
        state.withLock { $0.grpcServices[service] }
    }

    /// Every gRPC service some function serves.
    public var grpcServiceNames: [String] {
        state.withLock { Array($0.grpcServices.keys) }
    }

    /// The function serving a Thrift service (multiplexed `Service:method` calls).
    public func function(servingThriftService service: String) -> String? {
        state.withLock { $0.thriftServices[service] }
    }

    /// The function a plain Thrift method name belongs to (its manifest lists it under `thrift.methods`).
    public func function(servingThriftMethod method: String) -> String? {
        state.withLock { $0.thriftMethods[method] }
    }

    /// The manifests whose names a function owns: those of the versions its release routes to and of its latest
    /// version (the one a release is about to name).
    static func servedManifests(of entry: Entry) -> [FunctionManifest] {
        var numbers = Set(entry.record.release.weights.map(\.version))
        numbers.insert(entry.record.latestVersion)
        return numbers.sorted().compactMap { entry.versions[$0]?.manifest }
    }

    static func grpcServices(of entry: Entry) -> Set<String> {
        Set(servedManifests(of: entry).flatMap { $0.grpc?.services ?? [] })
    }

    /// Chooses the version that serves a request: the pinned one if given, else by release weight.
    public func route(function: String, pinnedVersion: Int?, roll: Int = Int.random(in: 0..<100)) throws(ApusError) -> FunctionVersion {
        guard let entry = entry(function) else {
            throw ApusError(.notFound, "no function named \(function)")
        }
        if let pinnedVersion {
            guard let version = entry.versions[pinnedVersion] else {
                throw ApusError(.notFound, "function \(function) has no version \(pinnedVersion)")
            }
            return version
        }
        guard let number = entry.record.release.pickVersion(roll: roll), let version = entry.versions[number] else {
            throw ApusError(.unavailable, "function \(function) has no released version")
        }
        return version
    }
}
