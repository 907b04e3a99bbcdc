import ApusCore
import Logging
import Synchronization

/// Processes started ahead of need, waiting to become instances: keeps `size` of them waiting or starting, hands
/// one out, and stops them all at shutdown. What a waiting process is — a prewarmed interpreter (`PrewarmPool`), a
/// sandbox slot in its cgroup (`SandboxSlotPool`) — is the owner's `spawn`.
final class WaitingProcesses: Sendable {
    let size: Int
    /// What the processes are, for the log ("prewarmed python3 process", "sandbox slot").
    private let kind: String
    private let spawn: @Sendable (ProcessLauncher) throws(ApusError) -> ManagedProcess
    private let logger: Logger
    private struct State {
        var idle: [ManagedProcess] = []
        var spawning = 0
        var closed = false
        var launcher: ProcessLauncher?
    }
    private let state = Mutex(State())

    init(size: Int, kind: String, logger: Logger, spawn: @escaping @Sendable (ProcessLauncher) throws(ApusError) -> ManagedProcess) {
        self.size = size
        self.kind = kind
        self.logger = logger
        self.spawn = spawn
    }

    /// Connects to the launcher that spawns the processes, and fills up.
    func attach(_ launcher: ProcessLauncher) {
        state.withLock { $0.launcher = launcher }
        replenish()
    }

    /// A waiting process (the first `preferred` one if any), or nil when none is waiting.
    func take(preferred: (ManagedProcess) -> Bool = { _ in true }) -> ManagedProcess? {
        state.withLock { state -> ManagedProcess? in
            state.idle.removeAll { $0.exit != nil }
            guard !state.idle.isEmpty else { return nil }
            return state.idle.remove(at: state.idle.firstIndex(where: preferred) ?? 0)
        }
    }

    /// Starts processes until `size` are waiting or starting.
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
            var process: ManagedProcess?
            do throws(ApusError) {
                process = try spawn(launcher)
                logger.debug("\(kind) started", metadata: ["pid": "\(process!.pid)"])
            } catch {
                logger.warning("cannot start a \(kind)", metadata: ["reason": "\(error.message)"])
            }
            let extra = state.withLock { state -> ManagedProcess? in
                state.spawning -= 1
                guard let process else { return nil }
                if state.closed { return process }
                state.idle.append(process)
                return nil
            }
            if let extra { Task { await extra.stop(grace: .milliseconds(200)) } }
        }
    }

    /// Stops every waiting process; none are started afterwards.
    func shutdown() async {
        let idle = state.withLock { state -> [ManagedProcess] in
            state.closed = true
            defer { state.idle.removeAll() }
            return state.idle
        }
        await withTaskGroup(of: Void.self) { group in
            for process in idle {
                group.addTask { await process.stop(grace: .milliseconds(500)) }
            }
        }
    }
}
