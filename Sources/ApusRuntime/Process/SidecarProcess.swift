#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore
import Foundation
import Logging
import Synchronization

/// How instances of `mesh.sidecar: true` functions get their `apus-sidecar` (`apusd --sidecar-binary`).
public struct SidecarSettings: Sendable {
    /// The `apus-sidecar` executable.
    public var binary: String
    /// The registry the sidecar resolves upstreams from: the apusd API URL (embedded registry) or `etcd://…`;
    /// asked at each launch because the API port is known only once it is bound.
    public var registryURL: @Sendable () -> String?
    /// The control-API token of the sidecars of a mesh service (scope `registry:<service>`), handed to the sidecar
    /// as `APUS_REGISTRY_TOKEN`; nil: none.
    public var registryToken: @Sendable (_ service: String) -> String?

    public init(binary: String, registryURL: @escaping @Sendable () -> String?,
                registryToken: @escaping @Sendable (_ service: String) -> String? = { _ in nil }) {
        self.binary = binary
        self.registryURL = registryURL
        self.registryToken = registryToken
    }

    /// `apus-sidecar` beside the running executable (apusd).
    public static var defaultBinary: String {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().path
        return URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent("apus-sidecar").path
    }

    /// The sidecar's command line (the contract with `apus-sidecar`): it proxies the instance's outbound calls on
    /// `outboundPort` (the instance gets `APUS_SIDECAR=http://127.0.0.1:<outboundPort>`), accepts mesh traffic for
    /// the instance on `inboundPort` and forwards it to the instance on `appPort`; `--no-register` because apusd
    /// registers the function itself (through the gateway).
    public static func arguments(binary: String, registry: String, outboundPort: Int, inboundPort: Int, appPort: Int,
                                 appProtocol: String, service: String, instanceID: String) -> [String] {
        [binary, "--registry", registry, "--outbound-port", String(outboundPort), "--inbound-port", String(inboundPort),
         "--app-port", String(appPort), "--app-protocol", appProtocol, "--service", service, "--instance-id", instanceID,
         "--no-register"]
    }
}

/// One running sidecar beside one instance: a child of apusd (not in the instance's sandbox), its output in the
/// function's log prefixed `[sidecar]`, stopped after its instance.
final class SidecarProcess: Sendable {
    let child: ChildProcess
    let outboundPort: Int
    let inboundPort: Int
    private let exited = Mutex<InstanceExit?>(nil)
    private let stopping = Atomic<Bool>(false)

    private init(child: ChildProcess, outboundPort: Int, inboundPort: Int) {
        self.child = child
        self.outboundPort = outboundPort
        self.inboundPort = inboundPort
    }

    /// `APUS_SIDECAR` for the instance.
    var outboundURL: String { "http://127.0.0.1:\(outboundPort)" }

    var exit: InstanceExit? { exited.withLock { $0 } }

    /// Starts the sidecar and waits until its outbound port accepts connections (or `timeout` passes, or it exits).
    static func start(settings: SidecarSettings, spec: InstanceSpec, service: String, appPort: Int, timeout: Duration,
                      logs: FunctionLogs, logger: Logger) async throws(ApusError) -> SidecarProcess {
        guard let registry = settings.registryURL() else {
            throw ApusError(.unavailable, "sidecar: the registry URL is not known yet (the API is not listening)")
        }
        let outbound = try FreePort.pick()
        var inbound = try FreePort.pick()
        while inbound == outbound { inbound = try FreePort.pick() }
        let argv = SidecarSettings.arguments(
            binary: settings.binary, registry: registry, outboundPort: outbound, inboundPort: inbound, appPort: appPort,
            appProtocol: spec.manifest.protocol.rawValue, service: service, instanceID: spec.instanceID)
        let host = ProcessInfo.processInfo.environment
        var environment = [
            "PATH": host["PATH"] ?? "/usr/local/bin:/usr/bin:/bin", "HOME": host["HOME"] ?? "/tmp", "LANG": "C.UTF-8",
            "APUS_FUNCTION": spec.version.function, "APUS_VERSION": String(spec.version.number), "APUS_INSTANCE": spec.instanceID,
        ]
        environment["APUS_REGISTRY_TOKEN"] = settings.registryToken(service)
        let function = spec.version.function
        let version = spec.version.number
        let child: ChildProcess
        do throws(ApusError) {
            child = try ChildProcess.spawn(argv: argv, environment: environment, workingDirectory: spec.codeDirectory.path)
        } catch {
            throw ApusError(.unavailable, "sidecar \(settings.binary) could not start: \(error.message)")
        }
        let sidecar = SidecarProcess(child: child, outboundPort: outbound, inboundPort: inbound)
        for (fd, stream) in [(child.stdoutFD, "stdout"), (child.stderrFD, "stderr")] {
            Thread.detachNewThread {
                LineReader.forEachLine(fd: fd) { line in
                    logs.append(function: function, version: version, instance: spec.instanceID, stream: stream, line: "[sidecar] " + line)
                }
            }
        }
        Thread.detachNewThread {
            let exit = child.waitForExit()
            child.signalGroup(SIGKILL)
            sidecar.exited.withLock { $0 = exit }
            logs.event(function: function, version: version, instance: spec.instanceID, "sidecar \(exit)")
            if !sidecar.stopping.load(ordering: .acquiring) {
                logger.warning("sidecar ended while its instance runs", metadata: [
                    "function": "\(function)", "instance": "\(spec.instanceID)", "exit": "\(exit)"])
            }
        }
        logs.event(function: function, version: version, instance: spec.instanceID,
                   "sidecar starting (pid \(child.pid), outbound \(outbound), inbound \(inbound), registry \(registry))")
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if let exit = sidecar.exit {
                throw ApusError(.unavailable, "sidecar \(exit) before it listened on its outbound port \(outbound)")
            }
            if ReadinessProbe.check(port: outbound, kind: .tcp, timeoutMilliseconds: 200) == .ready { break }
            if ContinuousClock.now >= deadline {
                await sidecar.stop(grace: .milliseconds(200))
                throw ApusError(.unavailable, "sidecar did not listen on its outbound port \(outbound) within \(timeout.humanReadable)")
            }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return sidecar
    }

    /// The instance's exit handler, stopping this sidecar first when the instance ends by itself.
    func stoppingOnExit(_ onExit: @escaping @Sendable (InstanceExit) -> Void) -> @Sendable (InstanceExit) -> Void {
        { exit in
            Task { await self.stop(grace: .seconds(2)) }
            onExit(exit)
        }
    }

    /// SIGTERM (the sidecar drains and deregisters), SIGKILL to its group after `grace`.
    func stop(grace: Duration) async {
        stopping.store(true, ordering: .releasing)
        guard exit == nil else { return }
        _ = kill(child.pid, SIGTERM)
        let deadline = ContinuousClock.now.advanced(by: grace)
        while exit == nil, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        if exit == nil {
            child.signalGroup(SIGKILL)
            while exit == nil { try? await Task.sleep(for: .milliseconds(20)) }
        }
    }
}

extension ProcessLauncher {
    /// Starts the instance's sidecar when its manifest asks for one (`mesh.sidecar: true`); nil otherwise.
    func startSidecar(for spec: InstanceSpec, appPort: Int) async throws(ApusError) -> SidecarProcess? {
        guard let mesh = spec.manifest.mesh, mesh.sidecar else { return nil }
        guard let settings = configuration.sidecar else {
            throw ApusError(.unavailable, "function asks for a sidecar (mesh.sidecar: true) but apusd runs without one")
        }
        return try await SidecarProcess.start(
            settings: settings, spec: spec, service: mesh.service, appPort: appPort, timeout: configuration.startTimeout,
            logs: logs, logger: logger)
    }
}
