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
    /// `outbound` (the instance gets `APUS_SIDECAR=http://<outbound>`; none for `egress: none`), accepts mesh
    /// traffic for the instance on loopback `inboundPort` and forwards it to the instance at `app`; `--no-register`
    /// because apusd registers the function itself (through the gateway).
    public static func arguments(binary: String, registry: String, outbound: InstanceEndpoint?, inboundPort: Int, app: InstanceEndpoint,
                                 appProtocol: String, service: String, instanceID: String) -> [String] {
        var argv = [binary, "--registry", registry]
        if let outbound { argv += ["--outbound-address", outbound.host, "--outbound-port", String(outbound.port)] }
        argv += ["--inbound-port", String(inboundPort), "--app-address", app.host, "--app-port", String(app.port),
                 "--app-protocol", appProtocol, "--service", service, "--instance-id", instanceID, "--no-register"]
        return argv
    }
}

/// One running sidecar beside one instance: a child of apusd (not in the instance's sandbox), its output in the
/// function's log prefixed `[sidecar]`, stopped after its instance.
final class SidecarProcess: Sendable {
    let child: ChildProcess
    /// Where the instance calls its sidecar: loopback, or the gateway of its namespace's link; nil for
    /// `egress: none` (the sidecar then only carries mesh traffic to the instance).
    let outbound: InstanceEndpoint?
    let inboundPort: Int
    private let exited = Mutex<InstanceExit?>(nil)
    private let stopping = Atomic<Bool>(false)

    private init(child: ChildProcess, outbound: InstanceEndpoint?, inboundPort: Int) {
        self.child = child
        self.outbound = outbound
        self.inboundPort = inboundPort
    }

    /// `APUS_SIDECAR` for the instance (nil: it gets none).
    var outboundURL: String? { outbound.map { "http://\($0)" } }

    var exit: InstanceExit? { exited.withLock { $0 } }

    /// Starts the sidecar and waits until its outbound port accepts connections (or `timeout` passes, or it exits).
    /// `network`: the instance's namespace; its sidecar then listens on the link's gateway at
    /// `InstanceNetworks.sidecarPort`, the one port of the node the instance reaches (none for `egress: none`).
    static func start(settings: SidecarSettings, spec: InstanceSpec, service: String, app: InstanceEndpoint,
                      network: InstanceNetworks.Network?, timeout: Duration,
                      logs: FunctionLogs, logger: Logger) async throws(ApusError) -> SidecarProcess {
        guard let registry = settings.registryURL() else {
            throw ApusError(.unavailable, "sidecar: the registry URL is not known yet (the API is not listening)")
        }
        let outbound: InstanceEndpoint?
        if let network {
            outbound = spec.manifest.egress == .none ? nil : InstanceEndpoint(address: network.gateway, port: InstanceNetworks.sidecarPort)
        } else {
            outbound = .loopback(port: try FreePort.pick())
        }
        var inbound = try FreePort.pick()
        while inbound == outbound?.port { inbound = try FreePort.pick() }
        let argv = SidecarSettings.arguments(
            binary: settings.binary, registry: registry, outbound: outbound, inboundPort: inbound, app: app,
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
        let sidecar = SidecarProcess(child: child, outbound: outbound, inboundPort: inbound)
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
                   "sidecar starting (pid \(child.pid), outbound \(outbound.map { "\($0)" } ?? "none (egress: none)"), inbound \(inbound), registry \(registry))")
        // Ready once it listens: on its outbound address, or (without one) its inbound port.
        let listening = outbound ?? .loopback(port: inbound)
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if let exit = sidecar.exit {
                throw ApusError(.unavailable, "sidecar \(exit) before it listened on \(listening)")
            }
            if ReadinessProbe.check(listening, kind: .tcp, timeoutMilliseconds: 200) == .ready { break }
            if ContinuousClock.now >= deadline {
                await sidecar.stop(grace: .milliseconds(200))
                throw ApusError(.unavailable, "sidecar did not listen on \(listening) within \(timeout.humanReadable)")
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
    func startSidecar(for spec: InstanceSpec, app: InstanceEndpoint, network: InstanceNetworks.Network?) async throws(ApusError) -> SidecarProcess? {
        guard let mesh = spec.manifest.mesh, mesh.sidecar else { return nil }
        guard let settings = configuration.sidecar else {
            throw ApusError(.unavailable, "function asks for a sidecar (mesh.sidecar: true) but apusd runs without one")
        }
        return try await SidecarProcess.start(
            settings: settings, spec: spec, service: mesh.service, app: app, network: network, timeout: configuration.startTimeout,
            logs: logs, logger: logger)
    }
}
