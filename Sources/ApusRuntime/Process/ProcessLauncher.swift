#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore
import Foundation
import Logging
import Synchronization

/// Launches instances as child processes following the runtime contract (docs/runtime-contract.md).
public final class ProcessLauncher: InstanceLauncher {
    public struct Configuration: Sendable {
        /// Interpreter for `runtime: python3`.
        public var python: String
        /// How long an instance has to become ready.
        public var startTimeout: Duration
        /// Directory holding `bootstrap.py`.
        public var runtimeDirectory: URL

        /// Prewarmed runtime processes to keep waiting (nil: none).
        public var prewarm: PrewarmSettings?
        /// The sidecar started beside instances of `mesh.sidecar: true` functions (nil: such functions fail to start).
        public var sidecar: SidecarSettings?
        /// Sandbox slots kept waiting in cgroups of their own for cold starts (`SandboxSlotPool`; 0: none).
        public var sandboxSlots: Int
        /// The values of a manifest's `secrets:` by environment variable name, asked for at every instance start (so
        /// an instance started after a secret changed gets the new value). nil: functions with `secrets:` do not
        /// start. The runtime knows nothing of where secrets are kept.
        public var secretEnvironment: (@Sendable ([String: FunctionManifest.SecretReference]) throws(ApusError) -> [String: String])?

        public init(python: String, startTimeout: Duration, runtimeDirectory: URL, prewarm: PrewarmSettings? = nil,
                    sidecar: SidecarSettings? = nil, sandboxSlots: Int = 2,
                    secretEnvironment: (@Sendable ([String: FunctionManifest.SecretReference]) throws(ApusError) -> [String: String])? = nil) {
            self.python = python
            self.startTimeout = startTimeout
            self.runtimeDirectory = runtimeDirectory
            self.prewarm = prewarm
            self.sidecar = sidecar
            self.sandboxSlots = sandboxSlots
            self.secretEnvironment = secretEnvironment
        }

        /// The bundled runtime files shipped with this module.
        public static var bundledRuntimeDirectory: URL {
            Bundle.module.resourceURL!.appendingPathComponent("Bootstrap")
        }

        public static func defaultPython() -> String {
            FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : (Sandbox.findExecutable("python3") ?? "python3")
        }
    }

    public let configuration: Configuration
    public let sandbox: Sandbox
    public let logs: FunctionLogs
    let logger: Logger
    /// Processes of running instances by instance id (their cgroups tell of OOM kills), and the last instances the
    /// OOM killer ended, for `failureReason(instanceID:)`.
    private let instances = Mutex<(live: [String: ManagedProcess], outOfMemory: [String: Int64], order: [String])>(([:], [:], []))
    private static let rememberedOOMKills = 256
    /// Generic runtime processes waiting to be given a function (nil when `--prewarm` asks for none).
    private let prewarmPool: PrewarmPool?
    /// Processes waiting in cgroups of their own to become an instance (nil without cgroups or when none asked).
    private let slotPool: SandboxSlotPool?

    public init(configuration: Configuration, sandbox: Sandbox, logs: FunctionLogs, logger: Logger) {
        self.configuration = configuration
        self.sandbox = sandbox
        self.logs = logs
        self.logger = logger
        if let prewarm = configuration.prewarm, prewarm.python3 > 0 {
            self.prewarmPool = PrewarmPool(settings: prewarm, logger: logger)  // empties the folder
        } else {
            self.prewarmPool = nil
            if let folder = configuration.prewarm?.directory {
                // Sandbox slots keep their code folders here too: none from an earlier run is in use.
                try? FileManager.default.removeItem(at: folder)
                try? FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            }
        }
        if configuration.sandboxSlots > 0, sandbox.mode == .bubblewrap, sandbox.cgroups != nil, sandbox.initPath != nil {
            self.slotPool = SandboxSlotPool(size: configuration.sandboxSlots, logger: logger)
        } else {
            self.slotPool = nil
        }
        prewarmPool?.attach(self)
        slotPool?.attach(self)
    }

    /// The argv of the function's own process, with paths as the instance sees them.
    func command(for spec: InstanceSpec) -> [String] {
        let sandboxed = sandbox.mode == .bubblewrap
        switch spec.manifest.runtime {
        case .python3:
            let bootstrap = sandboxed
                ? "\(Sandbox.runtimeMount)/bootstrap.py"
                : configuration.runtimeDirectory.appendingPathComponent("bootstrap.py").path
            return [configuration.python, bootstrap]
        case .command:
            var argv = spec.manifest.command ?? []
            if let program = argv.first, program.contains("/"), !program.hasPrefix("/") {
                let root = sandboxed ? Sandbox.codeMount : spec.codeDirectory.path
                argv[0] = root + "/" + program.drop(while: { $0 == "." || $0 == "/" })
            } else if let program = argv.first, !program.contains("/"), !sandboxed {
                argv[0] = Sandbox.findExecutable(program) ?? program
            }
            return argv
        }
    }

    /// What every runtime process gets, before any function's settings.
    func baseEnvironment() -> [String: String] {
        let host = ProcessInfo.processInfo.environment
        return [
            "PATH": sandbox.mode == .bubblewrap ? "/usr/local/bin:/usr/bin:/bin" : (host["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            // glibc reserves 64 MiB of address space per malloc arena; keep RLIMIT_AS meaningful.
            "MALLOC_ARENA_MAX": "2",
        ]
    }

    /// The instance's environment: the base, the manifest's `env:`, the values of its `secrets:` (`secretValues`),
    /// then the platform's `APUS_` variables. It reaches the process through `execve`, a prewarmed process's stdin
    /// or a sandbox slot's pipe, and is never logged.
    func environment(for spec: InstanceSpec, port: Int, secretValues: [String: String] = [:]) -> [String: String] {
        var env = baseEnvironment()
        for (key, value) in spec.manifest.env { env[key] = value }
        for (key, value) in secretValues { env[key] = value }
        env["APUS_PORT"] = String(port)
        env["APUS_FUNCTION"] = spec.version.function
        env["APUS_VERSION"] = String(spec.version.number)
        env["APUS_PROTOCOL"] = spec.manifest.protocol.rawValue
        env["APUS_INSTANCE"] = spec.instanceID
        env["APUS_CONCURRENCY"] = String(spec.manifest.concurrency)
        if let thrift = spec.manifest.thrift {
            env["APUS_THRIFT_SERVICE"] = thrift.service
            env["APUS_THRIFT_TRANSPORT"] = thrift.transport.rawValue
            env["APUS_THRIFT_PROTOCOL"] = thrift.protocol.rawValue
        }
        if let handler = spec.manifest.handler { env["APUS_HANDLER"] = handler }
        return env
    }

    /// The decrypted values of the manifest's `secrets:`, read now (before any process or sidecar is taken, so a
    /// secret that cannot be read fails the start cleanly, naming it).
    func secretValues(for spec: InstanceSpec) throws(ApusError) -> [String: String] {
        let references = spec.manifest.secrets
        guard !references.isEmpty else { return [:] }
        guard let resolve = configuration.secretEnvironment else {
            throw ApusError(.unavailable, "function \(spec.version.function) uses secrets: and this node keeps no secrets")
        }
        return try resolve(references)
    }

    /// How a launch gets its process: a prewarmed interpreter, a waiting sandbox slot, or a new process (with its
    /// uid, cgroup and network already taken).
    private enum Start {
        case prewarmed(ManagedProcess)
        case slot(ManagedProcess)
        case new(Confinement)

        var network: InstanceNetworks.Network? {
            switch self {
            case .prewarmed(let process), .slot(let process): process.network
            case .new(let confinement): confinement.network
            }
        }
    }

    public func launch(_ spec: InstanceSpec, onExit: @escaping @Sendable (InstanceExit) -> Void) async throws(ApusError) -> any InstanceHandle {
        let port = try FreePort.pick()
        let function = spec.version.function
        let version = spec.version.number
        let owner = ManagedProcess.Owner(instanceID: spec.instanceID, function: function, version: version)
        let started = ContinuousClock.now
        var logger = self.logger
        logger[metadataKey: "function"] = "\(function)"
        logger[metadataKey: "version"] = "\(version)"
        logger[metadataKey: "instance"] = "\(spec.instanceID)"
        let limits = ResourceLimits(spec.manifest)
        let secretValues = try secretValues(for: spec)

        // The process (and with it the network namespace) first: the sidecar listens on the namespace's link.
        let start: Start
        if let warm = prewarmPool?.take(for: spec) {
            start = .prewarmed(warm)
        } else if let slot = slotPool?.take() {
            start = .slot(slot)
        } else {
            start = .new(try confine(name: spec.instanceID, limits: limits))
        }
        let endpoint = start.network.map { InstanceEndpoint(address: $0.address, port: port) } ?? .loopback(port: port)

        // mesh.sidecar: the sidecar starts before the instance, so the instance finds $APUS_SIDECAR listening.
        let sidecar: SidecarProcess?
        do throws(ApusError) {
            sidecar = try await startSidecar(for: spec, app: endpoint, network: start.network)
        } catch {
            await abandon(start)
            throw error
        }
        var instanceEnvironment = environment(for: spec, port: port, secretValues: secretValues)
        if let sidecar, let url = sidecar.outboundURL { instanceEnvironment["APUS_SIDECAR"] = url }
        let instanceOnExit = sidecar?.stoppingOnExit(onExit) ?? onExit
        let sandboxNote = "sandbox \(sandbox.mode.rawValue)\(start.network.map { ", network \($0.name) \(InstanceEndpoint.format($0.address)) egress \(spec.manifest.egress.rawValue)" } ?? "")"

        let process: ManagedProcess
        let prewarmed: Bool
        switch start {
        case .prewarmed(let warm):
            // A generic runtime process is already up with its interpreter loaded: give it this function's code
            // and identity, and it imports the handler and listens.
            do throws(ApusError) {
                try warm.specialise(spec: spec, port: port, environment: instanceEnvironment, owner: owner, onExit: instanceOnExit)
            } catch {
                logger.warning("prewarmed process could not be specialised, starting a new one", metadata: ["reason": "\(error.message)"])
                await warm.stop(grace: .milliseconds(200))
                await sidecar?.stop(grace: .milliseconds(200))
                return try await launch(spec, onExit: onExit)
            }
            process = warm
            prewarmed = true
            logs.event(function: function, version: version, instance: spec.instanceID, "starting from prewarmed process (pid \(warm.pid), port \(port), \(sandboxNote))")
        case .slot(let slot):
            guard let running = await startInSlot(slot, spec: spec, environment: instanceEnvironment, owner: owner,
                                                  onExit: instanceOnExit, logger: logger) else {
                await sidecar?.stop(grace: .milliseconds(200))
                return try await launch(spec, onExit: onExit)
            }
            process = running
            prewarmed = false
            logs.event(function: function, version: version, instance: spec.instanceID, "starting (pid \(process.pid), port \(port), \(sandboxNote), ready slot)")
        case .new(let confinement):
            let argv: [String]
            do throws(ApusError) {
                argv = try sandbox.wrap(
                    command: command(for: spec),
                    codeDirectory: spec.codeDirectory,
                    runtimeDirectory: spec.manifest.runtime == .python3 ? configuration.runtimeDirectory : nil,
                    limits: limits, uid: confinement.uid, cgroup: confinement.cgroup, network: confinement.network,
                    egress: spec.manifest.egress)
                process = try spawn(argv: argv, environment: instanceEnvironment,
                                    workingDirectory: spec.codeDirectory.path, owner: owner, onExit: instanceOnExit,
                                    confinement: confinement, memoryLimit: limits.memoryBytes)
            } catch {
                release(confinement)
                await sidecar?.stop(grace: .milliseconds(200))
                throw error
            }
            prewarmed = false
            logger.debug("instance spawned", metadata: ["pid": "\(process.pid)", "port": "\(port)", "argv": "\(argv.joined(separator: " "))"])
            logs.event(function: function, version: version, instance: spec.instanceID, "starting (pid \(process.pid), port \(port), \(sandboxNote))")
        }

        var outcome = await waitUntilReady(
            process, endpoint: endpoint, protocol: spec.manifest.protocol, deadline: started.advanced(by: configuration.startTimeout),
            firstPause: prewarmed ? 200 : (spec.manifest.runtime == .command ? 500 : 1_000),
            steadyFor: spec.manifest.runtime == .command && !prewarmed ? .milliseconds(30) : .zero,
            announcesListening: prewarmed && spec.manifest.protocol == .http)
        if prewarmed, let pool = prewarmPool {
            // The replacement's interpreter start takes tens of milliseconds of CPU: begin it once the new instance
            // has had time to serve the request that started it.
            Task {
                try? await Task.sleep(for: PrewarmPool.replenishDelay)
                pool.replenish()
            }
        }
        if case .success = outcome, let exit = process.markLaunched() {
            outcome = .failure(ApusError(.unavailable, "instance \(exit) right after it became ready"))
        }
        switch outcome {
        case .success:
            instances.withLock { $0.live[spec.instanceID] = process }
            let elapsed = ContinuousClock.now - started
            logs.event(function: function, version: version, instance: spec.instanceID, "ready in \(elapsed.milliseconds)ms\(prewarmed ? " (prewarmed)" : "")")
            logger.info("instance ready", metadata: ["coldStartMs": "\(elapsed.milliseconds)", "port": "\(port)", "prewarmed": "\(prewarmed)"])
            RuntimeMetrics.coldStart(function: function, runtime: spec.manifest.runtime.rawValue, prewarmed: prewarmed, duration: elapsed)
            return ProcessInstance(instanceID: spec.instanceID, endpoint: endpoint, process: process, sidecar: sidecar)
        case .failure(let error):
            logs.event(function: function, version: version, instance: spec.instanceID, "failed to start: \(error.message)")
            logger.warning("instance failed to start", metadata: ["reason": "\(error.message)"])
            RuntimeMetrics.startFailed(function: function, runtime: spec.manifest.runtime.rawValue)
            await process.stop(grace: .milliseconds(500))
            await sidecar?.stop(grace: .milliseconds(500))
            let tail = logs.tail(function: function, count: 3).filter { $0.contains(spec.instanceID) && $0.contains("stderr|") }.last
            let detail = tail.map { "; last stderr: " + ($0.components(separatedBy: "stderr| ").last ?? "") } ?? ""
            throw ApusError(error.code, error.message + detail)
        }
    }

    public func failureReason(instanceID: String) -> String? {
        let (process, limit) = instances.withLock { ($0.live[instanceID], $0.outOfMemory[instanceID]) }
        if let limit { return InstanceExit(status: nil, signal: SIGKILL, outOfMemoryLimit: limit).description }
        // The connection can close before the exit is seen: the cgroup already counts the kill.
        if let process, let cgroup = process.cgroup, cgroup.oomKills > 0 {
            return InstanceExit(status: nil, signal: SIGKILL, outOfMemoryLimit: process.memoryLimit).description
        }
        return nil
    }

    public func isRunning(instanceID: String) -> Bool {
        instances.withLock { $0.live[instanceID] != nil }
    }

    /// An instance's process ended: forget it, remembering an OOM kill for its callers' errors.
    private func instanceEnded(_ instanceID: String, exit: InstanceExit) {
        instances.withLock { state in
            state.live[instanceID] = nil
            guard let limit = exit.outOfMemoryLimit else { return }
            state.outOfMemory[instanceID] = limit
            state.order.append(instanceID)
            if state.order.count > Self.rememberedOOMKills {
                state.outOfMemory[state.order.removeFirst()] = nil
            }
        }
    }

    /// Stops the prewarmed processes and sandbox slots (instances are stopped by their pools), then removes the
    /// network namespaces and apusd's nftables table.
    public func shutdown() async {
        await prewarmPool?.shutdown()
        await slotPool?.shutdown()
        sandbox.networks?.tearDown()
    }

    /// Gives back what a launch took when it cannot go on (the sidecar failed to start).
    private func abandon(_ start: Start) async {
        switch start {
        case .prewarmed(let process), .slot(let process): await process.stop(grace: .milliseconds(200))
        case .new(let confinement): release(confinement)
        }
    }

    /// Starts the instance in a waiting sandbox slot; nil (the slot is stopped) when that fails, and the caller
    /// starts it the ordinary way.
    private func startInSlot(_ slot: ManagedProcess, spec: InstanceSpec, environment: [String: String], owner: ManagedProcess.Owner,
                             onExit: @escaping @Sendable (InstanceExit) -> Void, logger: Logger) async -> ManagedProcess? {
        let limits = ResourceLimits(spec.manifest)
        do throws(ApusError) {
            // The slot's own uid (its /etc already names it), taken when the slot was made.
            let uid = slot.assignedUID
            let defaultRoute = spec.manifest.egress == .all ? slot.network?.gateway : nil
            let command: [String]
            if slot.slot != nil, let uid {
                // Made ahead: the sandbox is up; its init waits for the instance's command.
                command = sandbox.innerCommand(command: self.command(for: spec), uid: uid, defaultRoute: defaultRoute)
            } else {
                command = try sandbox.confined(
                    command: self.command(for: spec), codeDirectory: spec.codeDirectory,
                    runtimeDirectory: spec.manifest.runtime == .python3 ? configuration.runtimeDirectory : nil,
                    limits: limits, uid: uid, defaultRoute: defaultRoute)
            }
            try slot.startInSlot(command: command, environment: environment, limits: limits,
                                 code: slot.slot != nil ? spec.codeDirectory : nil, owner: owner, onExit: onExit)
            return slot
        } catch {
            logger.warning("sandbox slot could not be used, starting the instance anew", metadata: ["reason": "\(error.message)"])
            await slot.stop(grace: .milliseconds(200))
            return nil
        }
    }

    struct Confinement: Sendable {
        var uid: UInt32?
        var cgroup: InstanceCgroup?
        var network: InstanceNetworks.Network?
    }

    /// Takes a uid, makes a cgroup with `limits` and takes a network namespace for a process about to start
    /// (`name`: unique per process).
    func confine(name: String, limits: ResourceLimits) throws(ApusError) -> Confinement {
        var confinement = Confinement()
        confinement.uid = try sandbox.identities?.allocate()
        do throws(ApusError) {
            // A cgroup and a namespace only where apus-sandbox-init puts the process in them.
            if sandbox.initPath != nil {
                confinement.cgroup = try sandbox.cgroups?.create(name: name, limits: limits)
                confinement.network = try sandbox.networks?.take()
            }
        } catch {
            release(confinement)
            throw error
        }
        return confinement
    }

    /// Gives back a process's uid, removes its cgroup and its network namespace (once it has ended, or when it
    /// never started).
    func release(_ confinement: Confinement) {
        confinement.cgroup?.remove()
        if let network = confinement.network { sandbox.networks?.release(network) }
        if let uid = confinement.uid { sandbox.identities?.release(uid) }
    }

    /// Spawns a child and starts the threads that carry its output to the function's log and notice its exit.
    func spawn(
        argv: [String], environment: [String: String], workingDirectory: String, owner: ManagedProcess.Owner?,
        onExit: (@Sendable (InstanceExit) -> Void)?, stdinPipe: Bool = false, slot: URL? = nil,
        confinement: Confinement = Confinement(), memoryLimit: Int64 = 0
    ) throws(ApusError) -> ManagedProcess {
        let child = try ChildProcess.spawn(argv: argv, environment: environment, workingDirectory: workingDirectory, stdinPipe: stdinPipe)
        let process = ManagedProcess(child: child, owner: owner, onExit: onExit, slot: slot, cgroup: confinement.cgroup,
                                     network: confinement.network, memoryLimit: memoryLimit)
        // The process's uid, for whoever hands it an instance later (a sandbox slot runs its instance as it).
        if let uid = confinement.uid { process.assignUID(uid) }
        let logs = self.logs
        let logger = self.logger
        for (fd, stream) in [(child.stdoutFD, "stdout"), (child.stderrFD, "stderr")] {
            Thread.detachNewThread {
                LineReader.forEachLine(fd: fd) { line in
                    if let owner = process.owner {
                        if line == ManagedProcess.prewarmListeningLine, process.markListening() { return }
                        logs.append(function: owner.function, version: owner.version, instance: owner.instanceID, stream: stream, line: line)
                    } else if line == ManagedProcess.prewarmReadyLine {
                        process.markPrewarmReady()
                    } else {
                        logger.debug("prewarmed process output", metadata: ["pid": "\(child.pid)", "stream": "\(stream)", "line": "\(line)"])
                    }
                }
            }
        }
        Thread.detachNewThread {
            var exit = child.waitForExit()
            child.signalGroup(SIGKILL)  // leftovers in the group
            if let cgroup = confinement.cgroup, cgroup.oomKills > 0 {
                exit.outOfMemoryLimit = process.memoryLimit
                if let owner = process.owner {
                    RuntimeMetrics.outOfMemory(function: owner.function)
                }
            }
            if let owner = process.owner { self.instanceEnded(owner.instanceID, exit: exit) }
            var confinement = confinement
            if confinement.uid == nil { confinement.uid = process.assignedUID }  // a sandbox slot gets its uid late
            self.release(confinement)
            let ended = process.markExited(exit)
            if let slot { try? FileManager.default.removeItem(at: slot) }
            guard let owner = ended.owner else {
                if !ended.stopping { logger.warning("prewarmed process ended before it was used", metadata: ["pid": "\(child.pid)", "exit": "\(exit)"]) }
                return
            }
            logs.event(function: owner.function, version: owner.version, instance: owner.instanceID, "\(exit)\(ended.stopping ? " (stopped)" : "")")
            let meta: Logger.Metadata = ["function": "\(owner.function)", "version": "\(owner.version)", "instance": "\(owner.instanceID)", "exit": "\(exit)"]
            if ended.stopping {
                logger.debug("instance stopped", metadata: meta)
            } else if ended.launched {
                logger.warning("instance ended unexpectedly", metadata: meta)
            }
            // Before readiness the failure is reported by `launch` throwing, not through `onExit`.
            if ended.launched { ended.onExit?(exit) }
        }
        return process
    }

    /// Probes the instance's port until it is ready, the process ends, or `deadline` passes.
    /// `firstPause` (µs) is the wait after the first probe: 1 ms for a new interpreter, 0.5 ms for a native
    /// server, less for a prewarmed process, which is listening within a few milliseconds. For `steadyFor` after the
    /// start the pause stays at `firstPause` (a native server is typically ready within 10 ms, and a probe of a
    /// port nobody listens on costs tens of microseconds), then it grows.
    private func waitUntilReady(
        _ process: ManagedProcess, endpoint: InstanceEndpoint, protocol: FunctionManifest.WireProtocol, deadline: ContinuousClock.Instant,
        firstPause: UInt32, steadyFor: Duration = .zero, announcesListening: Bool = false
    ) async -> Result<Void, ApusError> {
        let startTimeout = configuration.startTimeout
        let probe: ReadinessProbe.Kind = switch `protocol` {
        case .http: .http
        case .grpc: .http2
        case .thrift: .tcp
        }
        // Off the cooperative pool: the probe blocks on a socket.
        return await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                var lastProblem = "did not listen on its port"
                // Probe often at first (a native server is ready within a few ms, Python within ~50 ms) and back
                // off gently: `firstPause` (steady for `steadyFor`), growing by a quarter per probe, at most 20 ms
                // between probes.
                var pause = firstPause
                let steadyUntil = ContinuousClock.now.advanced(by: steadyFor)
                while true {
                    if let exit = process.exit {
                        continuation.resume(returning: .failure(ApusError(.unavailable, "instance \(exit) before it was ready")))
                        return
                    }
                    if announcesListening, process.listening.wait(timeout: .now()) == .success {
                        continuation.resume(returning: .success(()))
                        return
                    }
                    switch ReadinessProbe.check(endpoint, kind: probe) {
                    case .ready:
                        continuation.resume(returning: .success(()))
                        return
                    case .notListening:
                        lastProblem = "did not listen on port \(endpoint.port)"
                    case .unhealthy(let reason):
                        lastProblem = reason
                    }
                    if ContinuousClock.now >= deadline {
                        continuation.resume(returning: .failure(ApusError(.unavailable, "instance not ready within \(startTimeout.humanReadable): \(lastProblem)")))
                        return
                    }
                    if announcesListening {
                        // Woken by the instance's own announcement, or the next probe after `pause`.
                        if process.listening.wait(timeout: .now() + .microseconds(Int(pause))) == .success {
                            continuation.resume(returning: .success(()))
                            return
                        }
                    } else {
                        usleep(pause)
                    }
                    if ContinuousClock.now >= steadyUntil { pause = min(pause + pause / 4, 20_000) }
                }
            }
        }
    }
}

/// A ready instance handed to a pool: its identity and endpoint never change, its process does the work.
struct ProcessInstance: InstanceHandle {
    let instanceID: String
    let endpoint: InstanceEndpoint
    let process: ManagedProcess
    var port: Int { endpoint.port }
    /// The instance's `apus-sidecar` (mesh.sidecar), stopped after the instance so its calls in flight finish.
    var sidecar: SidecarProcess? = nil

    var pid: Int32 { process.pid }

    func stop(grace: Duration) async {
        await process.stop(grace: grace)
        await sidecar?.stop(grace: grace)
    }
}

/// One child process and what is known of it. A prewarmed process starts without an owner (its output goes to the
/// daemon's log) and gets one when it is specialised for an instance.
final class ManagedProcess: Sendable {
    struct Owner: Sendable {
        var instanceID: String
        var function: String
        var version: Int
    }

    /// What a prewarmed bootstrap prints once its interpreter and libraries are loaded.
    static let prewarmReadyLine = "apus-prewarm: ready"
    /// What a specialised HTTP instance prints once it listens with its handler loaded (its readiness).
    static let prewarmListeningLine = "apus-prewarm: listening"
    /// Signalled once when `prewarmListeningLine` arrives.
    let listening = DispatchSemaphore(value: 0)

    private struct State {
        var owner: Owner?
        var onExit: (@Sendable (InstanceExit) -> Void)?
        var exit: InstanceExit?
        var stopping = false
        var launched = false
        var prewarmReady = false
        var listening = false
    }

    let child: ChildProcess
    /// The code folder a prewarmed process sees as its code (removed when the process ends).
    let slot: URL?
    private let state: Mutex<State>

    /// The process's cgroup (limits change when a prewarmed process becomes an instance); nil without cgroups.
    let cgroup: InstanceCgroup?
    /// The process's network namespace; nil without them.
    let network: InstanceNetworks.Network?
    private let memoryLimitBytes: Atomic<Int64>

    init(child: ChildProcess, owner: Owner?, onExit: (@Sendable (InstanceExit) -> Void)?, slot: URL?,
         cgroup: InstanceCgroup? = nil, network: InstanceNetworks.Network? = nil, memoryLimit: Int64 = 0) {
        self.child = child
        self.slot = slot
        self.cgroup = cgroup
        self.network = network
        self.memoryLimitBytes = Atomic(memoryLimit)
        self.state = Mutex(State(owner: owner, onExit: onExit))
    }

    private let uidAssigned = Atomic<UInt32>(0)

    /// The uid a sandbox slot was given when it became an instance (released when it ends).
    var assignedUID: UInt32? {
        let uid = uidAssigned.load(ordering: .acquiring)
        return uid == 0 ? nil : uid
    }

    func assignUID(_ uid: UInt32) {
        uidAssigned.store(uid, ordering: .releasing)
    }

    /// The memory limit in force (reported when the OOM killer ends the process).
    var memoryLimit: Int64 {
        get { memoryLimitBytes.load(ordering: .relaxed) }
    }

    /// Gives the process `limits` (a prewarmed process taking on a function's).
    func applyLimits(_ limits: ResourceLimits) throws(ApusError) {
        try cgroup?.apply(limits)
        memoryLimitBytes.store(limits.memoryBytes, ordering: .relaxed)
    }

    var pid: Int32 { child.pid }
    var owner: Owner? { state.withLock { $0.owner } }
    var exit: InstanceExit? { state.withLock { $0.exit } }
    var isPrewarmReady: Bool { state.withLock { $0.prewarmReady } }

    func markPrewarmReady() {
        state.withLock { $0.prewarmReady = true }
    }

    /// Records the listening line; true the first time (the line is then not the function's output).
    func markListening() -> Bool {
        let first = state.withLock { state in
            defer { state.listening = true }
            return !state.listening
        }
        if first { listening.signal() }
        return first
    }

    /// Gives a prewarmed process its instance: from now on its output and exit belong to that instance.
    /// Returns false if the process already ended.
    func assign(_ owner: Owner, onExit: @escaping @Sendable (InstanceExit) -> Void) -> Bool {
        state.withLock { state in
            guard state.exit == nil else { return false }
            state.owner = owner
            state.onExit = onExit
            return true
        }
    }

    /// Records the exit; returns what the exit thread needs to report it. The exit handler is handed over, not
    /// kept: it may hold its owner (the instance pool) strongly, and fires only once.
    func markExited(_ exit: InstanceExit) -> (owner: Owner?, onExit: (@Sendable (InstanceExit) -> Void)?, stopping: Bool, launched: Bool) {
        state.withLock { state in
            state.exit = exit
            let onExit = state.onExit
            state.onExit = nil
            return (state.owner, onExit, state.stopping, state.launched)
        }
    }

    /// Marks the instance as handed to the caller; returns its exit if it already ended (then it is not handed out).
    func markLaunched() -> InstanceExit? {
        state.withLock { state in
            if let exit = state.exit { return exit }
            state.launched = true
            return nil
        }
    }

    func stop(grace: Duration) async {
        let alreadyGone = state.withLock { state -> Bool in
            state.stopping = true
            return state.exit != nil
        }
        if alreadyGone { return }
        // SIGTERM goes to the function's own process (not a bwrap wrapper), so it can drain; SIGKILL to the group.
        _ = kill(child.functionProcess(), SIGTERM)
        let deadline = ContinuousClock.now.advanced(by: grace)
        while exit == nil, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        if exit == nil {
            child.signalGroup(SIGKILL)
            while exit == nil {
                try? await Task.sleep(for: .milliseconds(20))
            }
        }
    }
}

/// Reads a pipe to its end on the calling thread, handing over complete lines.
enum LineReader {
    static func forEachLine(fd: Int32, maxLine: Int = 16 << 10, _ body: (String) -> Void) {
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var pending: [UInt8] = []
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n < 0, errno == EINTR { continue }
            if n <= 0 { break }
            var start = 0
            for i in 0..<n where buffer[i] == UInt8(ascii: "\n") {
                pending += buffer[start..<i]
                body(String(decoding: pending, as: UTF8.self))
                pending.removeAll(keepingCapacity: true)
                start = i + 1
            }
            pending += buffer[start..<n]
            if pending.count > maxLine {
                body(String(decoding: pending, as: UTF8.self))
                pending.removeAll(keepingCapacity: true)
            }
        }
        if !pending.isEmpty { body(String(decoding: pending, as: UTF8.self)) }
    }
}
