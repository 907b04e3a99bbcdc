// apusd: every Apus role in one process — control API, HTTP gateway, scheduler and runtime (node agent) —
// run as one swift-service-lifecycle ServiceGroup over an embedded SQLite store in the data directory.
import ApusControl
import ApusCore
import ApusGateway
import ApusMesh
import ApusRuntime
import ApusScheduler
import ApusStore
import ApusTasks
import ApusTelemetry
import ArgumentParser
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

@main
struct Apusd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apusd",
        abstract: "Run the Apus platform: control API, gateway, scheduler and runtime in one process.")

    @Option(help: "Directory for the store, code and logs.")
    var dataDir = "./.apus"

    @Option(help: "Address the gateway listens on (loopback unless told otherwise).")
    var host = "127.0.0.1"

    @Option(help: "Address the control API listens on, apart from the gateway's --host (loopback unless told otherwise).")
    var apiHost = "127.0.0.1"

    @Option(help: "A host name mutating API calls may name in Host besides loopback names, IP addresses and --api-host (repeatable).")
    var apiAllowedHost: [String] = []

    @Flag(help: "Serve GET /metrics on the API port without a token (for a Prometheus scraper without one).")
    var apiOpenMetrics = false

    @Option(help: "PEM certificate chain: the control API speaks HTTPS (needs --api-tls-key).")
    var apiTlsCert: String?

    @Option(help: "PEM private key of --api-tls-cert.")
    var apiTlsKey: String?

    @Option(parsing: .unconditional, help: "Control API port (0 picks a free port).")
    var apiPort = 7070

    @Option(parsing: .unconditional, help: "Gateway HTTP port (0 picks a free port).")
    var httpPort = 8080

    @Option(parsing: .unconditional, help: "Gateway TLS port, HTTP/2 and HTTP/1.1 by ALPN (0 picks a free port; needs --tls-cert and --tls-key).")
    var tlsPort: Int?

    @Option(help: "PEM certificate chain for the TLS port.")
    var tlsCert: String?

    @Option(help: "PEM private key for the TLS port.")
    var tlsKey: String?

    @Option(parsing: .unconditional, help: "Gateway Thrift port: framed, buffered, THeader and TTHeader; binary and compact (0 picks a free port).")
    var thriftPort: Int?

    @Option(parsing: .unconditional, help: "Largest Thrift frame (or unframed message) accepted, in bytes.")
    var thriftMaxFrame = 16 << 20

    @Option(parsing: .unconditional, help: "Most bytes all Thrift connections together may hold in messages not yet whole; past it, the connection that would go over is closed.")
    var thriftMaxBuffered = 256 << 20

    @Option(parsing: .unconditional, help: "Most bytes of request bodies all HTTP connections together may hold in memory (HTTP/2 and gRPC streams waiting for an instance, asynchronous bodies being collected, HTTP/1.1 read-ahead past 64 KiB a connection); past it the request that would go over gets 429 or its connection is closed.")
    var httpMaxBuffered = 256 << 20

    @Option(parsing: .unconditional, help: "HTTP/2: streams a client may have open at once per connection.")
    var h2MaxStreams = 256

    @Option(parsing: .unconditional, help: "HTTP/2: per-stream flow-control window in bytes.")
    var h2Window = 1 << 20

    @Option(parsing: .unconditional, help: "HTTP/2: largest header list (HPACK-decoded) a client may send, in bytes.")
    var h2MaxHeaderList = 64 << 10

    @Option(help: "Domain for host routing: <function>.<domain>.")
    var domain = "apus.localhost"

    @Option(help: "Stop an instance above scale.min after it has been idle this long.")
    var idleTimeout = "60s"

    @Option(help: "Autoscaler stable window: demand is averaged over this long (the panic window is a tenth of it).")
    var autoscaleWindow = "60s"

    @Option(help: "Autoscaler: how long the stable window must be empty before the last instance may go.")
    var scaleToZeroGrace = "30s"

    @Option(parsing: .unconditional, help: "Autoscaler: share of a function's concurrency each instance is sized for (0.1 to 1).")
    var targetUtilisation = 0.7

    @Option(help: "How long an instance has to become ready.")
    var startTimeout = "10s"

    @Option(help: "How long a stopping instance gets between SIGTERM and SIGKILL.")
    var stopGrace = "5s"

    @Option(parsing: .unconditional, help: "Requests that may wait per function version before new ones are refused (429).")
    var queueLength = 1000

    @Option(help: "Deploy this function directory at start-up (repeatable); unchanged code is not redeployed.")
    var deploy: [String] = []

    @Option(help: "Python interpreter for runtime: python3.")
    var python: String?

    @Option(help: "Keep COUNT generic runtime processes started and waiting, specialised with a function's code on a cold start: RUNTIME=COUNT (repeatable; prewarmable: python3).")
    var prewarm: [String] = []

    @Option(help: "Directory holding the bundled runtime files (bootstrap.py); default: the copy beside the binary.")
    var runtimeDir: String?

    @Flag(help: "Run instances without bubblewrap even where it works (rlimits only; implies --insecure-sandbox).")
    var noSandbox = false

    @Flag(help: "Start even when a sandbox layer is missing (see --check); without it apusd refuses to run instances less isolated than it can.")
    var insecureSandbox = false

    @Flag(help: "Print which sandbox layers this host gives instances, then exit (0: all of them, 1: some missing).")
    var check = false

    @Option(help: "IPv4 range instance network namespaces are numbered from (each apusd on the host claims a /20 of it: 1023 instances); the range is refused as a destination from every instance. 'none': no network namespaces (needs --insecure-sandbox).")
    var instanceNetwork = InstanceNetworks.defaultRange

    @Option(help: "Largest memory a function may ask for (memory: in apus.yaml; default: this host's memory).")
    var maxMemory: String?

    @Option(help: "Largest CPU a function may ask for (cpu: in apus.yaml, cores or millicores; default: this host's cores).")
    var maxCpu: String?

    @Option(parsing: .unconditional, help: "Largest pids (processes and threads) a function may ask for.")
    var maxPids = 4096

    @Option(help: "Task callbacks may go to this host, address or CIDR (repeatable); loopback, link-local and this node's own addresses are refused unless listed.")
    var callbackAllow: [String] = []

    @Option(parsing: .unconditional, help: "Client connections the gateway holds at once over all its listeners; past it new ones are closed at accept (default: half the descriptor limit, raised to its hard limit).")
    var maxConnections: Int?

    @Option(help: "Gateway: an HTTP/1.1 connection waiting for its next request is closed after this long.")
    var connectionIdleTimeout = "60s"

    @Option(help: "Gateway: a request head must arrive whole within this long (else 408 and the connection closes).")
    var requestHeadTimeout = "10s"

    @Option(parsing: .unconditional, help: "Control API: connections held at once; past it new ones wait in the listen backlog.")
    var apiMaxConnections = 1024

    @Option(help: "Control API: a connection with no request in progress is closed after this long.")
    var apiIdleTimeout = "60s"

    @Option(parsing: .unconditional, help: "Sandbox slots kept waiting, already in cgroups of their own, so a cold start skips the cgroup join (0: none).")
    var sandboxSlots = 2

    @Option(help: "Range of uids (and gids) instances run as, one per instance: FIRST-LAST.")
    var sandboxUids = "200000-265535"

    @Option(parsing: .unconditional, help: "Shard size: with more ready instances than this, each gateway worker sends a version's requests to its consistent-hash subset of this many instances, spilling to the rest only when those are busy (0: off).")
    var shardSize = 0

    @Option(parsing: .unconditional, help: "Event-loop threads of the gateway (default: one per core); the HTTP/1.1 reactor runs as many.")
    var gatewayThreads: Int?

    @Option(help: "Who serves plaintext HTTP/1.1 on the HTTP port: reactor (the gateway's own epoll threads, handing HTTP/2 and every other case to SwiftNIO) or nio (SwiftNIO alone).")
    var http1Engine = "reactor"

    @Option(help: "Tasks: largest result kept (e.g. 1Mi); a larger result fails the task.")
    var taskResultLimit = "1Mi"

    @Option(help: "Tasks: largest payload accepted (e.g. 6Mi).")
    var taskMaxPayload = "6Mi"

    @Option(help: "Tasks: how long finished tasks are kept (e.g. 168h).")
    var taskRetention = "168h"

    @Option(help: "Tasks: full (fsync every commit: acknowledged tasks survive power loss) or normal (survive a killed process, not a power loss).")
    var taskDurability = "full"

    @Option(help: "Tasks: how long a running task asked to cancel gets before it is torn down and its instance replaced.")
    var taskCancelGrace = "5s"

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    @Option(help: "Service registry: embedded (in this process, served on the API port) or etcd://host:port (etcd v3).")
    var registry = "embedded"

    @Option(help: "The apus-sidecar started beside instances of mesh.sidecar functions (default: apus-sidecar beside apusd).")
    var sidecarBinary: String?

    @Option(help: "Address functions are registered in the mesh with (default: --host).")
    var advertiseAddress: String?

    /// `value`, once the database file it opened is made readable by apusd alone (SQLite gives its -wal and -shm
    /// files the database's mode).
    static func privateFile<T>(_ value: T, _ file: URL) -> T {
        for suffix in ["", "-wal", "-shm", "-journal"] { chmod(file.path + suffix, 0o600) }
        return value
    }

    /// A binary installed beside apusd (apus-sidecar, apus-sandbox-init).
    static func besideExecutable(_ name: String) -> String {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().path
        return URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent(name).path
    }

    func parseDuration(_ text: String, _ option: String) throws -> Duration {
        guard let duration = Duration(humanReadable: text) else {
            throw ValidationError("--\(option): not a duration (\(text)); use e.g. 500ms, 30s, 5m")
        }
        return duration
    }

    func validate() throws {
        if tlsPort != nil, tlsCert == nil || tlsKey == nil {
            throw ValidationError("--tls-port needs --tls-cert and --tls-key")
        }
        if tlsPort == nil, tlsCert != nil || tlsKey != nil {
            throw ValidationError("--tls-cert and --tls-key need --tls-port")
        }
        if (apiTlsCert == nil) != (apiTlsKey == nil) {
            throw ValidationError("--api-tls-cert and --api-tls-key go together")
        }
        do { _ = try PrewarmSettings.parseCounts(prewarm) } catch { throw ValidationError(error.message) }
        // Numeric options take negative values as values (not as flags), so every range is checked here.
        for (flag, port) in [("--api-port", apiPort), ("--http-port", httpPort), ("--tls-port", tlsPort), ("--thrift-port", thriftPort)] {
            if let port, !(0...65535).contains(port) { throw ValidationError("\(flag): must be 0...65535 (got \(port))") }
        }
        guard (0...1_000_000).contains(queueLength) else { throw ValidationError("--queue-length: must be 0...1000000 (got \(queueLength))") }
        if let gatewayThreads, !(1...1024).contains(gatewayThreads) {
            throw ValidationError("--gateway-threads: must be 1...1024 (got \(gatewayThreads))")
        }
        guard (0...1000).contains(shardSize) else { throw ValidationError("--shard-size: must be 0...1000 (got \(shardSize))") }
        guard (0.1...1).contains(targetUtilisation) else { throw ValidationError("--target-utilisation: must be 0.1...1 (got \(targetUtilisation))") }
        guard (1...100_000).contains(h2MaxStreams) else { throw ValidationError("--h2-max-streams: must be 1...100000 (got \(h2MaxStreams))") }
        guard (65_535...(1 << 31) - 1).contains(h2Window) else { throw ValidationError("--h2-window: must be 65535...2147483647 (got \(h2Window))") }
        guard (1024...(1 << 30)).contains(thriftMaxFrame) else { throw ValidationError("--thrift-max-frame: must be 1024...1073741824 (got \(thriftMaxFrame))") }
        guard (1024...(1 << 40)).contains(thriftMaxBuffered) else { throw ValidationError("--thrift-max-buffered: must be 1024...1099511627776 bytes (got \(thriftMaxBuffered))") }
        guard (1024...(1 << 40)).contains(httpMaxBuffered) else { throw ValidationError("--http-max-buffered: must be 1024...1099511627776 bytes (got \(httpMaxBuffered))") }
        guard (1024...(16 << 20)).contains(h2MaxHeaderList) else { throw ValidationError("--h2-max-header-list: must be 1024...16777216 (got \(h2MaxHeaderList))") }
        if let maxMemory, ByteSize.parse(maxMemory).map({ $0 >= 16 << 20 }) != true {
            throw ValidationError("--max-memory: must be a size of at least 16Mi such as 8Gi (got \(maxMemory))")
        }
        if let maxCpu, FunctionManifest.parseCPU(maxCpu).map({ $0 >= 10 }) != true {
            throw ValidationError("--max-cpu: must be cores such as 4 or millicores such as 1500m (got \(maxCpu))")
        }
        guard (1...1_000_000).contains(apiMaxConnections) else {
            throw ValidationError("--api-max-connections: must be 1...1000000 (got \(apiMaxConnections))")
        }
        guard (0...64).contains(sandboxSlots) else { throw ValidationError("--sandbox-slots: must be 0...64 (got \(sandboxSlots))") }
        guard (8...65_536).contains(maxPids) else { throw ValidationError("--max-pids: must be 8...65536 (got \(maxPids))") }
        if case .failure(let error) = CallbackPolicy.parse(callbackAllow) { throw ValidationError(error.message) }
        if let maxConnections, !(1...1_000_000).contains(maxConnections) {
            throw ValidationError("--max-connections: must be 1...1000000 (got \(maxConnections))")
        }
        guard SandboxIdentities.parseRange(sandboxUids) != nil else {
            throw ValidationError("--sandbox-uids: must be FIRST-LAST with 1000 <= FIRST, LAST < 4294967295 and at least 16 uids (got \(sandboxUids))")
        }
        guard ["reactor", "nio"].contains(http1Engine) else { throw ValidationError("--http1-engine: must be reactor or nio (got \(http1Engine))") }
        if registry != "embedded" {
            guard registry.hasPrefix("etcd://") || registry.hasPrefix("etcd+https://") else {
                throw ValidationError("--registry: must be embedded or etcd://host:port (got \(registry))")
            }
            do { _ = try makeSnapshottingServiceRegistry(url: registry, logger: Logger(label: "apus.registry")) } catch { throw ValidationError("--registry: \(error)") }
        }
    }

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "apusd")
        let metrics = PrometheusExport(help: TaskMetrics.help)
        metrics.bootstrap()
        let idle = try parseDuration(idleTimeout, "idle-timeout")
        let start = try parseDuration(startTimeout, "start-timeout")
        let grace = try parseDuration(stopGrace, "stop-grace")

        let dataURL = URL(fileURLWithPath: dataDir, isDirectory: true).standardizedFileURL
        let sandbox = Sandbox.detect(
            disabled: noSandbox, logger: logger, stateDirectory: dataURL.appendingPathComponent("sandbox"),
            initPath: Self.besideExecutable("apus-sandbox-init"), uids: SandboxIdentities.parseRange(sandboxUids)!,
            instanceNetwork: noSandbox ? nil : instanceNetwork)
        let layers = sandbox.layers
        if check {
            print("sandbox layers: \(layers.summary)")
            for line in sandbox.privilege { print("mode: \(line)") }
            for problem in sandbox.problems { print("missing: \(problem)") }
            if let networks = sandbox.networks {
                print("instance networks: \(networks.name), instance API at \(InstanceEndpoint.format(networks.servicesAddress)):\(InstanceNetworks.servicesPort)")
                networks.tearDown()
            }
            throw ExitCode(layers.complete ? 0 : 1)
        }
        if layers.complete {
            logger.info("sandbox layers", metadata: ["layers": "\(layers.summary)", "mode": "\(sandbox.privilege.joined(separator: "; "))"])
        } else if insecureSandbox || noSandbox {
            logger.warning("SANDBOX INCOMPLETE (allowed by \(noSandbox ? "--no-sandbox" : "--insecure-sandbox"))", metadata: [
                "layers": "\(layers.summary)", "mode": "\(sandbox.privilege.joined(separator: "; "))",
                "missing": "\(sandbox.problems.joined(separator: "; "))"])
        } else {
            throw ValidationError("refusing to start: instances would run with sandbox layers missing (\(layers.summary)): \(sandbox.problems.joined(separator: "; ")). Fix the host (docs/security.md) or pass --insecure-sandbox to run anyway.")
        }
        try FileManager.default.createDirectory(at: dataURL, withIntermediateDirectories: true)
        // The data directory holds the store, every function's code and environment, and the task queue: apusd's
        // alone (instances reach their own code through bind mounts, never through this path).
        chmod(dataURL.path, 0o700)
        let store = try Self.privateFile(SQLiteStore(path: dataURL.appendingPathComponent("apus.db").path),
                                         dataURL.appendingPathComponent("apus.db"))
        let code = try CodeStore(root: dataURL.appendingPathComponent("code"))
        let logs = try FunctionLogs(directory: dataURL.appendingPathComponent("logs"))
        // Stored secrets, sealed under <data-dir>/secrets.key (made on first start, 0600; never remade over secrets
        // sealed with a lost one).
        let (sealer, sealerNote) = try SecretSealer.load(in: dataURL, mayCreate: try store.secretKeys().isEmpty)
        if sealer.hasKey { logger.info("\(sealerNote)") } else { logger.error("\(sealerNote)") }
        let secrets = SecretVault(store: store, sealer: sealer)

        // Control-API tokens; on first start an admin token whose secret only <data-dir>/admin.token holds.
        let authority = try TokenAuthority(store: store)
        let adminToken = try authority.ensureAdminTokenFile(in: dataURL)
        logger.info("\(adminToken)")
        // A sidecar may register and resolve its own service's endpoints only (embedded registry; etcd has access
        // control of its own).
        let embeddedRegistry = registry == "embedded"
        let sidecarToken: @Sendable (String) -> String? = { service in
            embeddedRegistry ? authority.sidecarSecret(service: service) : nil
        }

        let prewarmCounts = try PrewarmSettings.parseCounts(prewarm)
        let ports = BoundPorts(host: host, apiHost: apiHost, apiScheme: apiTlsCert == nil ? "http" : "https",
                               file: dataURL.appendingPathComponent("ports.json"))
        let mesh = try MeshSetup(registry: registry, host: host, advertiseAddress: advertiseAddress, ports: ports)
        let launcher = ProcessLauncher(
            configuration: .init(
                python: python ?? ProcessLauncher.Configuration.defaultPython(),
                startTimeout: start,
                runtimeDirectory: runtimeDir.map { URL(fileURLWithPath: $0, isDirectory: true) }
                    ?? ProcessLauncher.Configuration.bundledRuntimeDirectory,
                prewarm: PrewarmSettings(python3: prewarmCounts["python3"] ?? 0, directory: dataURL.appendingPathComponent("prewarm")),
                sidecar: SidecarSettings(
                    binary: sidecarBinary ?? SidecarSettings.defaultBinary, registryURL: mesh.sidecarRegistryURL,
                    registryToken: sidecarToken),
                sandboxSlots: sandboxSlots,
                secretEnvironment: { references throws(ApusError) in try secrets.environment(for: references) }),
            sandbox: sandbox, logs: logs, logger: Logger(label: "apus.runtime"))

        var http2Limits = GatewayServer.HTTP2Limits()
        http2Limits.maxConcurrentStreams = h2MaxStreams
        http2Limits.initialWindowSize = h2Window
        http2Limits.maxHeaderListSize = h2MaxHeaderList
        var tls: GatewayServer.TLS?
        if let tlsPort, let tlsCert, let tlsKey {
            tls = GatewayServer.TLS(port: tlsPort, certificatePath: tlsCert, keyPath: tlsKey)
            _ = try GatewayServer.makeTLSContext(tls!)  // a bad certificate or key stops start-up with its reason
        }

        let catalog = FunctionCatalog()
        let scheduler = Scheduler(
            configuration: .init(queueLength: queueLength, idleTimeout: idle, stopGrace: grace, shardSize: shardSize),
            catalog: catalog, launcher: launcher,
            codeDirectory: { version throws(ApusError) in try code.unpacked(version.codeDigest) },
            logger: Logger(label: "apus.scheduler"))
        let autoscaler = Autoscaler(
            scheduler: scheduler,
            settings: .init(targetUtilisation: targetUtilisation, stableWindow: try parseDuration(autoscaleWindow, "autoscale-window"),
                            scaleToZeroGrace: try parseDuration(scaleToZeroGrace, "scale-to-zero-grace")),
            logger: Logger(label: "apus.autoscaler"))
        let deployLimits = ControlPlane.DeployLimits(
            maxMemory: maxMemory.flatMap(ByteSize.parse) ?? Int64(ProcessInfo.processInfo.physicalMemory),
            maxCPUMillis: maxCpu.flatMap(FunctionManifest.parseCPU) ?? ProcessInfo.processInfo.activeProcessorCount * 1000,
            maxPids: maxPids)
        let control = ControlPlane(store: store, code: code, scheduler: scheduler, logs: logs, limits: deployLimits,
                                   secrets: secrets, logger: Logger(label: "apus.control"))
        try control.loadCatalog()

        for directory in deploy {
            let archive = try CodeArchive.pack(directory: URL(fileURLWithPath: directory))
            let result = try control.deploy(archive: archive, release: true, skipIfUnchanged: true)
            FileHandle.standardOutput.write(Data("apusd: \(result.created ? "deployed" : "unchanged") \(result.function) version \(result.version.number) from \(directory)\n".utf8))
        }

        guard let resultLimit = ByteSize.parse(taskResultLimit), resultLimit >= 0, resultLimit <= 1 << 30 else {
            throw ValidationError("--task-result-limit: must be a size up to 1Gi such as 256Ki or 1Mi (got \(taskResultLimit))")
        }
        guard let maxPayload = ByteSize.parse(taskMaxPayload), maxPayload >= 1, maxPayload <= 1 << 30 else {
            throw ValidationError("--task-max-payload: must be a size up to 1Gi such as 6Mi (got \(taskMaxPayload))")
        }
        guard let durability = TaskStore.Durability(rawValue: taskDurability) else {
            throw ValidationError("--task-durability: must be full or normal (got \(taskDurability))")
        }
        var taskConfiguration = TaskManager.Configuration(
            maxPayloadBytes: Int(maxPayload), resultLimit: Int(resultLimit),
            retention: try parseDuration(taskRetention, "task-retention"),
            cancelGrace: try parseDuration(taskCancelGrace, "task-cancel-grace"))
        taskConfiguration.callbackPolicy = try CallbackPolicy.parse(callbackAllow).get()
        taskConfiguration.progressCapability = { id in authority.progressCapability(taskID: id) }
        let tasks = try TaskManager(
            configuration: taskConfiguration,
            store: try Self.privateFile(TaskStore(path: dataURL.appendingPathComponent("tasks.sqlite").path, durability: durability),
                                        dataURL.appendingPathComponent("tasks.sqlite")),
            scheduler: scheduler, invoker: InstanceTaskInvoker(),
            apiBase: { ports.apiURL },
            instanceAPIBase: sandbox.networks.map { "http://\(InstanceEndpoint.format($0.servicesAddress)):\(InstanceNetworks.servicesPort)" },
            logger: Logger(label: "apus.tasks"))
        let stopping = ShutdownFlag()
        var api = ControlAPI(
            control: control,
            info: {
                ControlAPI.Info(
                    version: "0.1.0", gateway: .init(http: ports.gatewayURL), domain: domain, sandbox: sandbox.mode.rawValue,
                    sandboxLayers: layers)
            },
            stopping: stopping, metrics: metrics, logger: Logger(label: "apus.api"))
        api.tasks = tasks
        api.authority = authority
        api.policy = APIPolicy(allowedHosts: [apiHost] + apiAllowedHost, openMetrics: apiOpenMetrics)
        let router = api.makeRouter()
        RegistryAPI(registry: mesh.registry, stopping: stopping).addRoutes(to: router)
        for route in router.routes where APIPolicy.rules["\(route.method.rawValue) \(route.path)"] == nil {
            logger.warning("control route without a rule in APIPolicy.rules: admin only", metadata: ["route": "\(route.method.rawValue) \(route.path)"])
        }
        // The control API on an event loop of its own, so the gateway's load cannot stall it; past
        // --api-max-connections it stops accepting until connections close; idle connections close after
        // --api-idle-timeout (requests in progress, long-polls included, are not idle).
        let apiIdle = try parseDuration(apiIdleTimeout, "api-idle-timeout")
        var apiServer: HTTPServerBuilder = .http1(configuration: .init(idleTimeout: .nanoseconds(apiIdle.nanoseconds)))
        if let apiTlsCert, let apiTlsKey {
            // A bad certificate or key stops start-up with its reason.
            let certificates = try NIOSSLCertificate.fromPEMFile(apiTlsCert).map { NIOSSLCertificateSource.certificate($0) }
            let key = try NIOSSLPrivateKey(file: apiTlsKey, format: .pem)
            apiServer = try .tls(apiServer, tlsConfiguration: .makeServerConfiguration(certificateChain: certificates, privateKey: .privateKey(key)))
        }
        let apiApp = Application(
            router: router,
            server: apiServer,
            configuration: .init(address: .hostname(apiHost, port: apiPort), serverName: "apus-api",
                                 availableConnectionsDelegate: MaximumAvailableConnections(apiMaxConnections)),
            onServerRunning: { channel in ports.bound(api: channel.localAddress?.port ?? 0) },
            eventLoopGroupProvider: .shared(MultiThreadedEventLoopGroup(numberOfThreads: 1)),
            logger: Logger(label: "apus.api"))
        // Instances in network namespaces of their own reach apusd at one address only: the instance API, which
        // serves task progress and nothing else.
        let instanceAPI = sandbox.networks.map { networks in
            Application(
                router: ControlAPI.instanceRouter(tasks: tasks, authority: authority),
                server: .http1(configuration: .init(idleTimeout: .nanoseconds(apiIdle.nanoseconds))),
                configuration: .init(address: .hostname(InstanceEndpoint.format(networks.servicesAddress), port: InstanceNetworks.servicesPort),
                                     serverName: "apus-instance-api",
                                     availableConnectionsDelegate: MaximumAvailableConnections(apiMaxConnections)),
                eventLoopGroupProvider: .shared(MultiThreadedEventLoopGroup(numberOfThreads: 1)),
                logger: Logger(label: "apus.instance-api"))
        }
        var gatewayConfiguration = GatewayServer.Configuration(
            host: host, port: httpPort, domain: domain, http2: http2Limits, tls: tls,
            thriftPort: thriftPort, thriftMaxFrameBytes: thriftMaxFrame, tasks: tasks)
        gatewayConfiguration.http1Reactor = http1Engine == "reactor"
        gatewayConfiguration.thriftMaxBufferedBytes = thriftMaxBuffered
        gatewayConfiguration.httpMaxBufferedBytes = httpMaxBuffered
        gatewayConfiguration.invocationGuard = InvocationAuthenticator(
            tokens: authority, secrets: secrets, logger: Logger(label: "apus.gateway.auth"))
        gatewayConfiguration.maxConnections = maxConnections ?? GatewayServer.Configuration.defaultMaxConnections()
        gatewayConfiguration.idleTimeout = try parseDuration(connectionIdleTimeout, "connection-idle-timeout")
        gatewayConfiguration.headTimeout = try parseDuration(requestHeadTimeout, "request-head-timeout")
        let gateway = GatewayServer(
            configuration: gatewayConfiguration,
            scheduler: scheduler, logger: Logger(label: "apus.gateway"),
            group: gatewayThreads.map { MultiThreadedEventLoopGroup(numberOfThreads: max(1, $0)) } ?? MultiThreadedEventLoopGroup.singleton,
            onRunning: { bound in ports.bound(http: bound.http, tls: bound.tls, thrift: bound.thrift) })

        // Graceful shutdown runs in reverse order: the gateway drains first, then log streams end, the API
        // stops, and last the scheduler stops every instance.
        let group = ServiceGroup(configuration: .init(
            services: [
                .init(service: scheduler, serviceName: "scheduler"),
                .init(service: autoscaler, serviceName: "autoscaler"),
                .init(service: tasks, serviceName: "tasks"),
                .init(service: apiApp, serviceName: "api"),
            ] + (instanceAPI.map { [.init(service: $0, serviceName: "instance-api")] } ?? []) + [
                .init(service: mesh.registryService, serviceName: "registry"),
                .init(service: mesh.publisherService(catalog: catalog), serviceName: "mesh-publisher"),
                .init(service: FlagOnShutdown(flag: stopping), serviceName: "log-streams"),
                .init(service: gateway, serviceName: "gateway"),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
        logger.info("apusd stopped")
    }
}

/// Raises a flag when graceful shutdown begins.
struct FlagOnShutdown: Service {
    let flag: ShutdownFlag

    func run() async throws {
        try? await gracefulShutdown()
        flag.set()
    }
}

/// Collects the bound ports; once both listeners are up, prints them and writes `<data-dir>/ports.json`.
final class BoundPorts: Sendable {
    private let state = Mutex<(api: Int?, http: Int?, tls: Int?, thrift: Int?)>((nil, nil, nil, nil))
    let host: String
    /// The control API's address (`--api-host`) and scheme (https with `--api-tls-cert`).
    let apiHost: String
    let apiScheme: String
    let file: URL

    init(host: String, apiHost: String, apiScheme: String, file: URL) {
        self.host = host
        self.apiHost = apiHost
        self.apiScheme = apiScheme
        self.file = file
    }

    /// The API as a client on this node reaches it (loopback when it listens on every address).
    var apiURL: String? {
        state.withLock { $0.api }.map { "\(apiScheme)://\(Self.urlHost(Self.reachable(apiHost))):\($0)" }
    }

    /// A wildcard address is reached on loopback.
    static func reachable(_ host: String) -> String {
        host == "0.0.0.0" ? "127.0.0.1" : (host == "::" ? "::1" : host)
    }

    static func urlHost(_ host: String) -> String {
        host.contains(":") ? "[\(host)]" : host
    }

    var gatewayURL: String? {
        state.withLock { $0.http }.map { "http://\(host):\($0)" }
    }

    /// The bound API, gateway HTTP and Thrift ports (nil until bound).
    var apiPort: Int? { state.withLock { $0.api } }
    var gatewayPorts: (http: Int, thrift: Int?)? { state.withLock { s in s.http.map { ($0, s.thrift) } } }

    func bound(api: Int? = nil, http: Int? = nil, tls: Int? = nil, thrift: Int? = nil) {
        let all = state.withLock { state -> (Int, Int, Int?, Int?)? in
            if let api { state.api = api }
            if let http { state.http = http }
            if let tls { state.tls = tls }
            if let thrift { state.thrift = thrift }
            guard let a = state.api, let h = state.http else { return nil }
            return (a, h, state.tls, state.thrift)
        }
        guard let (apiPort, httpPort, tlsPort, thriftPort) = all else { return }
        let json = "{\"host\":\"\(host)\",\"apiHost\":\"\(Self.reachable(apiHost))\",\"apiScheme\":\"\(apiScheme)\",\"api\":\(apiPort),\"http\":\(httpPort)\(tlsPort.map { ",\"tls\":\($0)" } ?? "")\(thriftPort.map { ",\"thrift\":\($0)" } ?? "")}\n"
        let temp = file.deletingLastPathComponent().appendingPathComponent(".ports.json.tmp")
        try? json.write(to: temp, atomically: false, encoding: .utf8)
        // rename(2) replaces an earlier run's file atomically.
        if rename(temp.path, file.path) != 0 { try? FileManager.default.moveItem(at: temp, to: file) }
        var banner = "apusd: api listening on \(apiScheme)://\(Self.urlHost(apiHost)):\(apiPort)\napusd: gateway listening on http://\(host):\(httpPort) (HTTP/1.1, h2c, gRPC)\n"
        if let tlsPort { banner += "apusd: gateway listening on https://\(host):\(tlsPort) (TLS: h2, http/1.1)\n" }
        if let thriftPort { banner += "apusd: gateway listening on \(host):\(thriftPort) (Thrift)\n" }
        FileHandle.standardOutput.write(Data(banner.utf8))
    }
}
