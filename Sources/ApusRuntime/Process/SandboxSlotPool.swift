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
    /// Slots kept waiting.
    let size: Int
    private let logger: Logger
    private struct State {
        var idle: [ManagedProcess] = []
        var spawning = 0
        var closed = false
        var launcher: ProcessLauncher?
    }
    private let state = Mutex(State())

    /// A waiting slot's limits until it is taken (what a function gets by default).
    static let waitingLimits = ResourceLimits(memoryBytes: 256 << 20, cpuMillis: FunctionManifest.defaultCPUMillis,
                                              pids: FunctionManifest.defaultPids)

    init(size: Int, logger: Logger) {
        self.size = size
        self.logger = logger
    }

    func attach(_ launcher: ProcessLauncher) {
        state.withLock { $0.launcher = launcher }
        replenish()
    }

    /// A waiting slot, or nil when none is waiting (a replacement is started either way, after a moment).
    func take() -> ManagedProcess? {
        let taken = state.withLock { state -> ManagedProcess? in
            state.idle.removeAll { $0.exit != nil }
            return state.idle.isEmpty ? nil : state.idle.removeFirst()
        }
        Task {
            if taken != nil { try? await Task.sleep(for: PrewarmPool.replenishDelay) }
            self.replenish()
        }
        return taken
    }

    /// Starts slots until `size` are waiting or starting.
    func replenish() {
        let (launcher, wanted) = state.withLock { state -> (ProcessLauncher?, Int) in
            state.idle.removeAll { $0.exit != nil }
            guard !state.closed, let launcher = state.launcher else { return (nil, 0) }
            let wanted = max(0, size - state.idle.count - state.spawning)
            state.spawning += wanted
            return (launcher, wanted)
        }
        guard let launcher else { return }
        for _ in 0..<wanted {
            var slot: ManagedProcess?
            do throws(ApusError) {
                slot = try spawnWaiting(launcher)
            } catch {
                logger.warning("cannot start a sandbox slot", metadata: ["reason": "\(error.message)"])
            }
            let extra = state.withLock { state -> ManagedProcess? in
                state.spawning -= 1
                guard let slot else { return nil }
                if state.closed { return slot }
                state.idle.append(slot)
                return nil
            }
            if let extra { Task { await extra.stop(grace: .milliseconds(200)) } }
        }
    }

    private func spawnWaiting(_ launcher: ProcessLauncher) throws(ApusError) -> ManagedProcess {
        let confinement = try launcher.confine(name: Identifier.make(prefix: "slot-", length: 12), limits: Self.waitingLimits)
        guard confinement.cgroup != nil else {
            launcher.release(confinement)
            throw ApusError(.unavailable, "sandbox slots need cgroups")
        }
        let argv = launcher.sandbox.outerArguments(limits: Self.waitingLimits, cgroup: confinement.cgroup) + ["--wait"]
        do throws(ApusError) {
            return try launcher.spawn(argv: argv, environment: ["PATH": "/usr/bin:/bin"], workingDirectory: "/",
                                      owner: nil, onExit: nil, stdinPipe: true, confinement: confinement,
                                      memoryLimit: Self.waitingLimits.memoryBytes)
        } catch {
            launcher.release(confinement)
            throw error
        }
    }

    /// Ends every waiting slot (closing its input ends it); none are started afterwards.
    func shutdown() async {
        let idle = state.withLock { state -> [ManagedProcess] in
            state.closed = true
            defer { state.idle.removeAll() }
            return state.idle
        }
        await withTaskGroup(of: Void.self) { group in
            for slot in idle {
                group.addTask { await slot.stop(grace: .milliseconds(500)) }
            }
        }
    }
}

extension ManagedProcess {
    /// Turns a waiting sandbox slot into an instance: the function's limits on its cgroup, its owner, then the
    /// sandbox's command line and environment written to the waiting `apus-sandbox-init`, which executes them.
    func startInSlot(command: [String], environment: [String: String], limits: ResourceLimits, uid: UInt32?,
                     owner: Owner, onExit: @escaping @Sendable (InstanceExit) -> Void) throws(ApusError) {
        guard let stdinFD = child.stdinFD else {
            throw ApusError(.internal, "process \(pid) is not a sandbox slot")
        }
        defer { close(stdinFD) }
        try applyLimits(limits)
        if let uid { assignUID(uid) }
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
