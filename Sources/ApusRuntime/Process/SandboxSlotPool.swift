#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import Foundation
import Logging
import Synchronization

/// Sandbox slots: processes that have already joined a spare cgroup of their own and wait in
/// `apus-sandbox-init --wait` for the instance they will become. Joining a cgroup costs the kernel an RCU grace
/// period when no other join happened just before (7–24 ms measured on cgroup v1, docs/benchmarks.md) — most of
/// a native function's cold start. A cold start takes a slot instead: the function's limits are written to the
/// slot's cgroup, the sandbox's command line is written to the waiting process, which executes it; a replacement
/// slot is started off the request path.
final class SandboxSlotPool: Sendable {
    private let waiting: WaitingProcesses

    /// A waiting slot's limits until it is taken (what a function gets by default).
    static let waitingLimits = ResourceLimits(memoryBytes: 256 << 20, cpuMillis: FunctionManifest.defaultCPUMillis,
                                              pids: FunctionManifest.defaultPids)

    /// `size` slots kept waiting.
    init(size: Int, logger: Logger) {
        waiting = WaitingProcesses(size: size, kind: "sandbox slot", logger: logger) { launcher throws(ApusError) in
            try Self.spawnWaiting(launcher)
        }
    }

    func attach(_ launcher: ProcessLauncher) {
        waiting.attach(launcher)
    }

    /// A waiting slot, or nil when none is waiting (a replacement is started either way, after a moment).
    func take() -> ManagedProcess? {
        let taken = waiting.take()
        Task {
            if taken != nil { try? await Task.sleep(for: PrewarmPool.replenishDelay) }
            self.waiting.replenish()
        }
        return taken
    }

    private static func spawnWaiting(_ launcher: ProcessLauncher) throws(ApusError) -> ManagedProcess {
        let name = Identifier.make(prefix: "slot-", length: 12)
        let confinement = try launcher.confine(name: name, limits: waitingLimits)
        guard confinement.cgroup != nil else {
            launcher.release(confinement)
            throw ApusError(.unavailable, "sandbox slots need cgroups")
        }
        var argv = launcher.sandbox.outerArguments(limits: waitingLimits, cgroup: confinement.cgroup, network: confinement.network)
        // Where the slot can have a code folder of its own (beside the prewarmed processes'), it waits inside its
        // sandbox, made ahead: taking it is then a hard-linked code folder, the cgroup limits and one execve.
        var folder: URL?
        if let uid = confinement.uid, let root = launcher.configuration.prewarm?.directory {
            let code = root.appendingPathComponent("sandbox-" + name)
            do {
                try FileManager.default.createDirectory(at: code, withIntermediateDirectories: true)
            } catch {
                launcher.release(confinement)
                throw ApusError(.internal, "cannot create sandbox slot folder \(code.path): \(error)")
            }
            do throws(ApusError) {
                argv += ["--"] + (try launcher.sandbox.waitingInside(
                    codeDirectory: code, runtimeDirectory: launcher.configuration.runtimeDirectory,
                    tmpBytes: Int64(ProcessInfo.processInfo.physicalMemory), uid: uid))
                folder = code
            } catch {
                try? FileManager.default.removeItem(at: code)
                launcher.release(confinement)
                throw error
            }
        } else {
            argv += ["--wait"]
        }
        do throws(ApusError) {
            return try launcher.spawn(argv: argv, environment: ["PATH": "/usr/bin:/bin"], workingDirectory: "/",
                                      owner: nil, onExit: nil, stdinPipe: true, slot: folder, confinement: confinement,
                                      memoryLimit: waitingLimits.memoryBytes)
        } catch {
            if let folder { try? FileManager.default.removeItem(at: folder) }
            launcher.release(confinement)
            throw error
        }
    }

    /// Ends every waiting slot; none are started afterwards.
    func shutdown() async {
        await waiting.shutdown()
    }
}

extension ManagedProcess {
    /// Turns a waiting sandbox slot into an instance: the function's limits on its cgroup, its owner, then the
    /// sandbox's command line and environment written to the waiting `apus-sandbox-init`, which executes them.
    func startInSlot(command: [String], environment: [String: String], limits: ResourceLimits, code: URL?,
                     owner: Owner, onExit: @escaping @Sendable (InstanceExit) -> Void) throws(ApusError) {
        guard let stdinFD = child.stdinFD else {
            throw ApusError(.internal, "process \(pid) is not a sandbox slot")
        }
        defer { close(stdinFD) }
        if let code, let slot { try CodeLinker.link(contentsOf: code, into: slot) }
        try applyLimits(limits)
        guard assign(owner, onExit: onExit) else {
            throw ApusError(.unavailable, "sandbox slot \(pid) ended before it was used")
        }
        var message: [UInt8] = []
        for argument in command { message += Array(argument.utf8) + [0] }
        message.append(0)
        for (key, value) in environment.sorted(by: { $0.key < $1.key }) { message += Array("\(key)=\(value)".utf8) + [0] }
        var offset = 0
        while offset < message.count {
            let written = message[offset...].withUnsafeBytes { write(stdinFD, $0.baseAddress, $0.count) }
            if written < 0, errno == EINTR { continue }
            guard written > 0 else {
                throw ApusError(.unavailable, "cannot hand the instance's command to sandbox slot \(pid): \(String(cString: strerror(errno)))")
            }
            offset += written
        }
    }
}
