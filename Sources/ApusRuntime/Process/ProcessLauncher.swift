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

        public init(python: String, startTimeout: Duration, runtimeDirectory: URL) {
            self.python = python
            self.startTimeout = startTimeout
            self.runtimeDirectory = runtimeDirectory
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
    private let logger: Logger

    public init(configuration: Configuration, sandbox: Sandbox, logs: FunctionLogs, logger: Logger) {
        self.configuration = configuration
        self.sandbox = sandbox
        self.logs = logs
        self.logger = logger
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

    func environment(for spec: InstanceSpec, port: Int) -> [String: String] {
        let host = ProcessInfo.processInfo.environment
        var env: [String: String] = [
            "PATH": sandbox.mode == .bubblewrap ? "/usr/local/bin:/usr/bin:/bin" : (host["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            // glibc reserves 64 MiB of address space per malloc arena; keep RLIMIT_AS meaningful.
            "MALLOC_ARENA_MAX": "2",
        ]
        for (key, value) in spec.manifest.env { env[key] = value }
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

    public func launch(_ spec: InstanceSpec, onExit: @escaping @Sendable (InstanceExit) -> Void) async throws(ApusError) -> any InstanceHandle {
        let port = try FreePort.pick()
        let function = spec.version.function
        let version = spec.version.number
        let argv = sandbox.wrap(
            command: command(for: spec),
            codeDirectory: spec.codeDirectory,
            runtimeDirectory: spec.manifest.runtime == .python3 ? configuration.runtimeDirectory : nil,
            memoryLimit: spec.manifest.memory)
        let started = ContinuousClock.now
        let child = try ChildProcess.spawn(argv: argv, environment: environment(for: spec, port: port), workingDirectory: spec.codeDirectory.path)
        let instance = ProcessInstance(instanceID: spec.instanceID, port: port, child: child)
        var logger = self.logger
        logger[metadataKey: "function"] = "\(function)"
        logger[metadataKey: "version"] = "\(version)"
        logger[metadataKey: "instance"] = "\(spec.instanceID)"
        logger.debug("instance spawned", metadata: ["pid": "\(child.pid)", "port": "\(port)", "argv": "\(argv.joined(separator: " "))"])
        logs.event(function: function, version: version, instance: spec.instanceID, "starting (pid \(child.pid), port \(port), sandbox \(sandbox.mode.rawValue))")

        let logs = self.logs
        for (fd, stream) in [(child.stdoutFD, "stdout"), (child.stderrFD, "stderr")] {
            Thread.detachNewThread {
                LineReader.forEachLine(fd: fd) { line in
                    logs.append(function: function, version: version, instance: spec.instanceID, stream: stream, line: line)
                }
            }
        }
        let exitLogger = logger
        Thread.detachNewThread {
            let exit = child.waitForExit()
            child.signalGroup(SIGKILL)  // leftovers in the group
            let (wasStopping, wasLaunched) = instance.markExited(exit)
            logs.event(function: function, version: version, instance: spec.instanceID, "\(exit)\(wasStopping ? " (stopped)" : "")")
            if wasStopping {
                exitLogger.debug("instance stopped", metadata: ["exit": "\(exit)"])
            } else if wasLaunched {
                exitLogger.warning("instance ended unexpectedly", metadata: ["exit": "\(exit)"])
            }
            // Before readiness the failure is reported by `launch` throwing, not through `onExit`.
            if wasLaunched { onExit(exit) }
        }

        // Wait for readiness off the cooperative pool: the probe blocks on a socket.
        let deadline = started.advanced(by: configuration.startTimeout)
        var outcome: Result<Void, ApusError> = await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                var lastProblem = "did not listen on its port"
                // Probe often at first (a native server is ready within a few ms, Python within ~50 ms) and back
                // off gently: 1 ms, growing by a quarter per probe, at most 20 ms between probes.
                var pause: UInt32 = 1_000
                while true {
                    if let exit = instance.exit {
                        continuation.resume(returning: .failure(ApusError(.unavailable, "instance \(exit) before it was ready")))
                        return
                    }
                    let probe: ReadinessProbe.Kind = switch spec.manifest.protocol {
                    case .http: .http
                    case .grpc: .http2
                    case .thrift: .tcp
                    }
                    switch ReadinessProbe.check(port: port, kind: probe) {
                    case .ready:
                        continuation.resume(returning: .success(()))
                        return
                    case .notListening:
                        lastProblem = "did not listen on port \(port)"
                    case .unhealthy(let reason):
                        lastProblem = reason
                    }
                    if ContinuousClock.now >= deadline {
                        continuation.resume(returning: .failure(ApusError(.unavailable, "instance not ready within \(self.configuration.startTimeout.humanReadable): \(lastProblem)")))
                        return
                    }
                    usleep(pause)
                    pause = min(pause + pause / 4, 20_000)
                }
            }
        }
        if case .success = outcome, let exit = instance.markLaunched() {
            outcome = .failure(ApusError(.unavailable, "instance \(exit) right after it became ready"))
        }
        switch outcome {
        case .success:
            let elapsed = ContinuousClock.now - started
            logs.event(function: function, version: version, instance: spec.instanceID, "ready in \(elapsed.milliseconds)ms")
            logger.info("instance ready", metadata: ["coldStartMs": "\(elapsed.milliseconds)", "port": "\(port)"])
            return instance
        case .failure(let error):
            logs.event(function: function, version: version, instance: spec.instanceID, "failed to start: \(error.message)")
            logger.warning("instance failed to start", metadata: ["reason": "\(error.message)"])
            await instance.stop(grace: .milliseconds(500))
            let tail = logs.tail(function: function, count: 3).filter { $0.contains(spec.instanceID) && $0.contains("stderr|") }.last
            let detail = tail.map { "; last stderr: " + ($0.components(separatedBy: "stderr| ").last ?? "") } ?? ""
            throw ApusError(error.code, error.message + detail)
        }
    }
}

/// A running child process serving one instance.
final class ProcessInstance: InstanceHandle {
    let instanceID: String
    let port: Int
    let child: ChildProcess
    private let state = Mutex<(exit: InstanceExit?, stopping: Bool, launched: Bool)>((nil, false, false))

    var pid: Int32 { child.pid }

    init(instanceID: String, port: Int, child: ChildProcess) {
        self.instanceID = instanceID
        self.port = port
        self.child = child
    }

    var exit: InstanceExit? { state.withLock { $0.exit } }

    /// Records the exit; returns whether a stop had been asked for and whether the instance had been handed out.
    func markExited(_ exit: InstanceExit) -> (stopping: Bool, launched: Bool) {
        state.withLock { state in
            state.exit = exit
            return (state.stopping, state.launched)
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
