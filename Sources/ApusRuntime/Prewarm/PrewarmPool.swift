#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore
import Foundation
import Logging
import Synchronization

/// How many generic runtime processes to keep waiting, and where their code folders live (`apusd --prewarm`).
public struct PrewarmSettings: Sendable, Equatable {
    /// Python bootstrap processes kept started, imported and waiting for a function.
    public var python3: Int
    /// Folder for the per-process code folders (emptied at start).
    public var directory: URL
    /// Address-space limit a waiting process starts with; a specialised process lowers it to its function's
    /// `memory`. Functions asking for more start cold.
    public var memoryLimit: Int64

    public init(python3: Int, directory: URL, memoryLimit: Int64 = 1 << 30) {
        self.python3 = python3
        self.directory = directory
        self.memoryLimit = memoryLimit
    }

    /// The runtimes a prewarmed process can serve: only interpreters that can load a function's code after they
    /// started. A `command` function's process is its own binary.
    public static let prewarmableRuntimes: Set<String> = ["python3"]

    /// Reads `--prewarm RUNTIME=COUNT` values (repeatable) into a count per runtime.
    public static func parseCounts(_ values: [String]) throws(ApusError) -> [String: Int] {
        var counts: [String: Int] = [:]
        for value in values {
            let parts = value.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let count = Int(parts[1]), count >= 0, count <= 64 else {
                throw ApusError(.badRequest, "--prewarm \(value): expected RUNTIME=COUNT with COUNT from 0 to 64 (e.g. python3=2)")
            }
            guard prewarmableRuntimes.contains(parts[0]) else {
                if FunctionManifest.Runtime(rawValue: parts[0]) != nil {
                    throw ApusError(.badRequest, "--prewarm \(value): runtime \(parts[0]) cannot be prewarmed (its process is the function's own program); prewarmable: \(prewarmableRuntimes.sorted().joined(separator: ", "))")
                }
                throw ApusError(.badRequest, "--prewarm \(value): unknown runtime \(parts[0]); prewarmable: \(prewarmableRuntimes.sorted().joined(separator: ", "))")
            }
            counts[parts[0]] = count
        }
        return counts
    }
}

/// Keeps `python3` generic bootstrap processes started and waiting on their stdin. `take(for:)` hands one out to
/// become an instance (the launcher links the function's code into its code folder and writes the instance's
/// settings to its stdin), and a replacement is started at once.
///
/// Each waiting process runs in the same sandbox an instance gets, with its own empty code folder mounted as the
/// code directory, so a specialised process is confined exactly like a cold-started one.
final class PrewarmPool: Sendable {
    let settings: PrewarmSettings
    private let waiting: WaitingProcesses
    /// How long after a specialised instance is ready its replacement starts.
    static let replenishDelay: Duration = .milliseconds(200)

    init(settings: PrewarmSettings, logger: Logger) {
        self.settings = settings
        self.waiting = WaitingProcesses(size: settings.python3, kind: "prewarmed python3 process", logger: logger) {
            launcher throws(ApusError) in try Self.spawnWaiting(launcher, settings: settings)
        }
        try? FileManager.default.removeItem(at: settings.directory)
        try? FileManager.default.createDirectory(at: settings.directory, withIntermediateDirectories: true)
    }

    /// Connects the pool to the launcher that spawns its processes and fills it.
    func attach(_ launcher: ProcessLauncher) {
        waiting.attach(launcher)
    }

    /// Environment keys read when the interpreter starts: a function setting one cannot reuse a started process.
    static func readAtInterpreterStart(_ key: String) -> Bool {
        key.hasPrefix("PYTHON") || key.hasPrefix("LD_") || key.hasPrefix("MALLOC_")
    }

    /// Whether a waiting process can become an instance of `spec`. Waiting processes already have their network
    /// (with a default route when namespaces are on): they serve `egress: all` functions, the default, only.
    func canServe(_ spec: InstanceSpec) -> Bool {
        spec.manifest.runtime == .python3
            && spec.manifest.egress == .all
            && spec.manifest.memory <= settings.memoryLimit
            && !spec.manifest.env.keys.contains(where: Self.readAtInterpreterStart)
    }

    /// A waiting process for `spec` (one that finished loading first), or nil when none is waiting or the function
    /// needs a fresh interpreter. Starts a replacement either way.
    func take(for spec: InstanceSpec) -> ManagedProcess? {
        guard canServe(spec) else { return nil }
        let taken = waiting.take(preferred: { $0.isPrewarmReady })
        if taken == nil {
            Task { self.replenish() }  // any that died while waiting
        }
        // A taken process is replaced once its instance is ready (`ProcessLauncher.launch`), so the replacement's
        // interpreter start does not compete with the specialisation for the CPU.
        return taken
    }

    /// Starts processes until `python3` are waiting or starting.
    func replenish() {
        waiting.replenish()
    }

    private static func spawnWaiting(_ launcher: ProcessLauncher, settings: PrewarmSettings) throws(ApusError) -> ManagedProcess {
        let slot = settings.directory.appendingPathComponent(Identifier.make(prefix: "slot-", length: 12))
        do {
            try FileManager.default.createDirectory(at: slot, withIntermediateDirectories: true)
        } catch {
            throw ApusError(.internal, "cannot create prewarm folder \(slot.path): \(error)")
        }
        let sandboxed = launcher.sandbox.mode == .bubblewrap
        let bootstrap = sandboxed
            ? "\(Sandbox.runtimeMount)/bootstrap.py"
            : launcher.configuration.runtimeDirectory.appendingPathComponent("bootstrap.py").path
        // Waiting with the pool's limits; the function's own are applied when it is taken (`specialise`).
        let limits = ResourceLimits(memoryBytes: settings.memoryLimit, cpuMillis: FunctionManifest.defaultCPUMillis,
                                    pids: FunctionManifest.defaultPids)
        let confinement = try launcher.confine(name: "prewarm-" + slot.lastPathComponent, limits: limits)
        let process: ManagedProcess
        do throws(ApusError) {
            let argv = try launcher.sandbox.wrap(
                command: [launcher.configuration.python, bootstrap], codeDirectory: slot,
                runtimeDirectory: launcher.configuration.runtimeDirectory, limits: limits,
                uid: confinement.uid, cgroup: confinement.cgroup, network: confinement.network, egress: .all)
            var environment = launcher.baseEnvironment()
            environment["APUS_PREWARM"] = "1"
            process = try launcher.spawn(argv: argv, environment: environment, workingDirectory: slot.path,
                                         owner: nil, onExit: nil, stdinPipe: true, slot: slot,
                                         confinement: confinement, memoryLimit: limits.memoryBytes)
        } catch {
            launcher.release(confinement)
            throw error
        }
        return process
    }

    /// Stops every waiting process; none are started afterwards.
    func shutdown() async {
        await waiting.shutdown()
    }
}

extension ManagedProcess {
    /// Turns a waiting bootstrap into an instance of `spec`: links the code into its code folder, hands it the
    /// instance's identity, then writes the instance's settings (port, environment, memory limit) to its stdin.
    func specialise(
        spec: InstanceSpec, port: Int, environment: [String: String], owner: Owner,
        onExit: @escaping @Sendable (InstanceExit) -> Void
    ) throws(ApusError) {
        guard let slot, let stdinFD = child.stdinFD else {
            throw ApusError(.internal, "process \(pid) is not a prewarmed process")
        }
        try CodeLinker.link(contentsOf: spec.codeDirectory, into: slot)
        try applyLimits(ResourceLimits(spec.manifest))
        guard assign(owner, onExit: onExit) else {
            throw ApusError(.unavailable, "prewarmed process \(pid) ended before it was used")
        }
        // With a cgroup the memory limit is already the cgroup's; the bootstrap lowers its address-space rlimit only
        // where there is none.
        let settings: [String: any Sendable] = ["port": port, "env": environment, "memory": cgroup == nil ? spec.manifest.memory : 0]
        var message: [UInt8]
        do {
            message = Array(try JSONSerialization.data(withJSONObject: settings, options: [.sortedKeys]))
        } catch {
            throw ApusError(.internal, "cannot encode the instance settings: \(error)")
        }
        message.append(UInt8(ascii: "\n"))
        defer { close(stdinFD) }
        var offset = 0
        while offset < message.count {
            let written = message[offset...].withUnsafeBytes { write(stdinFD, $0.baseAddress, $0.count) }
            if written < 0, errno == EINTR { continue }
            guard written > 0 else {
                throw ApusError(.unavailable, "cannot hand the instance settings to prewarmed process \(pid): \(String(cString: strerror(errno)))")
            }
            offset += written
        }
    }
}

/// Fills a prewarmed process's code folder with a version's unpacked code: hard links (the code store and the
/// prewarm folders are both in the data directory), copies where links are not possible.
enum CodeLinker {
    static func link(contentsOf source: URL, into destination: URL) throws(ApusError) {
        let files = FileManager.default
        guard let walker = files.enumerator(at: source, includingPropertiesForKeys: [.isDirectoryKey, .isSymbolicLinkKey]) else {
            throw ApusError(.internal, "cannot read code folder \(source.path)")
        }
        let base = source.standardizedFileURL.path
        do {
            for case let item as URL in walker {
                let relative = String(item.standardizedFileURL.path.dropFirst(base.count + 1))
                let target = destination.appendingPathComponent(relative)
                let values = try item.resourceValues(forKeys: [.isDirectoryKey, .isSymbolicLinkKey])
                if values.isSymbolicLink == true {
                    try files.copyItem(at: item, to: target)
                } else if values.isDirectory == true {
                    try files.createDirectory(at: target, withIntermediateDirectories: true)
                } else if Glibc.link(item.path, target.path) != 0 {
                    try files.copyItem(at: item, to: target)
                }
            }
        } catch {
            throw ApusError(.internal, "cannot place code from \(source.path) in \(destination.path): \(error)")
        }
    }
}
