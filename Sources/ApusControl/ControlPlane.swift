import ApusCore
import ApusRuntime
import ApusScheduler
import ApusStore
import Foundation
import Logging

/// Carries out control-plane changes against the store and keeps the scheduler's catalog in step.
public final class ControlPlane: Sendable {
    public struct DeployResult: Sendable, Codable {
        public var function: String
        public var version: FunctionVersion
        public var release: Release
        /// False when `skipIfUnchanged` found the same code and manifest already deployed.
        public var created: Bool
    }

    /// The most a function may ask for on this node (`apusd --max-memory`, `--max-cpu`, `--max-pids`).
    public struct DeployLimits: Sendable {
        public var maxMemory: Int64
        public var maxCPUMillis: Int
        public var maxPids: Int

        public init(maxMemory: Int64 = Int64.max, maxCPUMillis: Int = Int.max, maxPids: Int = Int.max) {
            self.maxMemory = maxMemory
            self.maxCPUMillis = maxCPUMillis
            self.maxPids = maxPids
        }

        /// Refuses a manifest that asks for more than this node gives, naming the key and the limit.
        public func check(_ manifest: FunctionManifest) throws(ApusError) {
            if manifest.memory > maxMemory {
                throw ApusError(.badRequest, "memory: \(ByteSize.format(manifest.memory)) is above this node's limit of \(ByteSize.format(maxMemory)) (apusd --max-memory)")
            }
            if manifest.cpuMillis > maxCPUMillis {
                throw ApusError(.badRequest, "cpu: \(FunctionManifest.formatCPU(manifest.cpuMillis)) is above this node's limit of \(FunctionManifest.formatCPU(maxCPUMillis)) (apusd --max-cpu)")
            }
            if manifest.pids > maxPids {
                throw ApusError(.badRequest, "pids: \(manifest.pids) is above this node's limit of \(maxPids) (apusd --max-pids)")
            }
        }
    }

    public let store: any Store
    public let code: CodeStore
    public let scheduler: Scheduler
    public let logs: FunctionLogs
    public let limits: DeployLimits
    /// What a code archive may hold (entries, unpacked bytes, manifest size).
    public let archiveLimits: CodeArchive.Limits
    /// Stored secrets (`apus secret`, a manifest's `secrets:`); nil: this node keeps none, and deploys naming one
    /// are refused.
    public let secrets: SecretVault?
    private let logger: Logger
    public static let maxArchiveBytes = 64 << 20

    public init(store: any Store, code: CodeStore, scheduler: Scheduler, logs: FunctionLogs, limits: DeployLimits = DeployLimits(),
                archiveLimits: CodeArchive.Limits = CodeArchive.Limits(), secrets: SecretVault? = nil, logger: Logger) {
        self.store = store
        self.code = code
        self.scheduler = scheduler
        self.logs = logs
        self.limits = limits
        self.archiveLimits = archiveLimits
        self.secrets = secrets
        self.logger = logger
    }

    public var catalog: FunctionCatalog { scheduler.catalog }

    /// Fills the catalog from the store (at start-up).
    public func loadCatalog() throws(ApusError) {
        for record in try store.functions() {
            try refresh(record.name)
        }
    }

    private func refresh(_ name: String) throws(ApusError) {
        guard let record = try store.function(named: name) else {
            catalog.remove(name)
            return
        }
        catalog.update(.init(record: record, versions: try store.versions(of: name)))
    }

    /// Creates a new version from a tar.gz of a function directory.
    public func deploy(archive: Data, release: Bool, skipIfUnchanged: Bool = false) throws(ApusError) -> DeployResult {
        guard archive.count <= Self.maxArchiveBytes else {
            throw ApusError(.tooLarge, "code archive is \(archive.count) bytes; the limit is \(Self.maxArchiveBytes)")
        }
        guard archive.count > 2, archive[archive.startIndex] == 0x1f, archive[archive.startIndex + 1] == 0x8b else {
            throw ApusError(.badRequest, "upload must be a gzip-compressed tar archive of the function directory")
        }
        // Its table of contents first: nothing is read, kept or unpacked from an archive that holds device nodes,
        // unpacks past the limits, or carries an oversized apus.yaml.
        let contents = try CodeArchive.inspect(archive, limits: archiveLimits)
        guard contents.manifestBytes != nil else {
            throw ApusError(.badRequest, "archive has no \(FunctionManifest.fileName) at its root")
        }
        let manifestData: Data
        do {
            manifestData = try CodeArchive.readMember(FunctionManifest.fileName, of: archive)
        } catch {
            throw ApusError(.badRequest, "archive has no \(FunctionManifest.fileName) at its root (\(error.message))")
        }
        let manifest = try FunctionManifest.parse(yaml: String(decoding: manifestData, as: UTF8.self))
        try limits.check(manifest)
        try checkSecrets(of: manifest)
        if let auth = manifest.auth { try InvocationAuthenticator.check(auth, secrets: secrets) }
        for service in manifest.grpc?.services ?? [] {
            if let owner = catalog.function(servingGRPCService: service), owner != manifest.name {
                throw ApusError(.conflict, "gRPC service \(service) is already served by function \(owner); a service belongs to one function")
            }
        }
        if let thrift = manifest.thrift {
            if let owner = catalog.function(servingThriftService: thrift.service), owner != manifest.name {
                throw ApusError(.conflict, "Thrift service \(thrift.service) is already served by function \(owner); a service belongs to one function")
            }
            for method in thrift.methods {
                if let owner = catalog.function(servingThriftMethod: method), owner != manifest.name {
                    throw ApusError(.conflict, "Thrift method \(method) is already routed to function \(owner); plain method names must be unique")
                }
            }
        }
        if let mesh = manifest.mesh, let owner = catalog.function(servingMeshService: mesh.service), owner != manifest.name {
            throw ApusError(.conflict, "mesh service \(mesh.service) is already registered by function \(owner); a mesh service belongs to one function")
        }
        let digest = CodeStore.digest(of: archive)

        if skipIfUnchanged, let record = try store.function(named: manifest.name),
           let latest = try store.version(record.latestVersion, of: manifest.name),
           latest.codeDigest == digest, latest.manifest == manifest {
            return DeployResult(function: manifest.name, version: latest, release: record.release, created: false)
        }

        code.deployStarted(digest)
        defer { code.deployFinished(digest) }
        try code.put(archive)
        _ = try code.unpacked(digest)  // proves the archive extracts before a version points at it
        let (version, newRelease) = try store.createVersion(manifest: manifest, codeDigest: digest, release: release, now: Date())
        try refresh(manifest.name)
        scheduler.reconcile(function: manifest.name)
        logger.info("deployed", metadata: [
            "function": "\(manifest.name)", "version": "\(version.number)", "digest": "\(digest)",
            "release": "\(newRelease.weights.map { "\($0.version)=\($0.weight)" }.joined(separator: ","))",
        ])
        return DeployResult(function: manifest.name, version: version, release: newRelease, created: true)
    }

    /// Refuses a manifest whose `secrets:` name a secret or key that is not stored (the values themselves are read
    /// when instances start).
    func checkSecrets(of manifest: FunctionManifest) throws(ApusError) {
        guard !manifest.secrets.isEmpty else { return }
        guard let secrets else {
            throw ApusError(.badRequest, "\(FunctionManifest.fileName): secrets: this node keeps no secrets")
        }
        try secrets.check(manifest.secrets)
    }

    public func setRelease(function: String, weights: [Release.Weight]) throws(ApusError) -> Release {
        let release = try store.setRelease(of: function, weights: weights, now: Date())
        try refresh(function)
        scheduler.reconcile(function: function)
        logger.info("released", metadata: [
            "function": "\(function)",
            "release": "\(weights.map { "\($0.version)=\($0.weight)" }.joined(separator: ","))",
        ])
        return release
    }

    /// Sets or clears the function's instance bounds without a deploy; pools follow at once.
    public func setScale(function: String, scale: ScaleOverride?) throws(ApusError) -> FunctionRecord {
        let record = try requireFunction(function)
        if let scale {
            try scale.validate(against: try store.version(record.latestVersion, of: function)?.manifest.scale)
        }
        let updated = try store.setScale(of: function, scale: scale, now: Date())
        try refresh(function)
        scheduler.reconcile(function: function)
        logger.info("scale override \(scale == nil ? "cleared" : "set")", metadata: [
            "function": "\(function)", "min": "\(scale?.min.map(String.init) ?? "-")", "max": "\(scale?.max.map(String.init) ?? "-")",
        ])
        return updated
    }

    public func delete(function: String) async throws(ApusError) {
        try store.deleteFunction(named: function)
        catalog.remove(function)
        await scheduler.remove(function: function)
        logs.remove(function: function)
        collectCode()
        logger.info("deleted", metadata: ["function": "\(function)"])
    }

    /// Removes code blobs and unpacked code that no version of any function refers to any more.
    func collectCode() {
        do throws(ApusError) {
            var referenced: Set<String> = []
            for record in try store.functions() {
                for version in try store.versions(of: record.name) { referenced.insert(version.codeDigest) }
            }
            let removed = code.collectGarbage(keeping: referenced)
            if removed > 0 { logger.info("code no version refers to removed", metadata: ["archives": "\(removed)"]) }
        } catch {
            logger.warning("cannot collect unreferenced code", metadata: ["reason": "\(error.message)"])
        }
    }

    public func requireFunction(_ name: String) throws(ApusError) -> FunctionRecord {
        guard let record = try store.function(named: name) else {
            throw ApusError(.notFound, "function \(name) does not exist")
        }
        return record
    }
}
