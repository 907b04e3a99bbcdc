import ApusMesh
import ApusSidecarCore
import ArgumentParser
import Dispatch
import Foundation
import Logging
import Metrics
import NIOCore
import NIOPosix
import ApusTelemetry
import Prometheus

/// `apus-sidecar`: the mesh proxy beside a function instance or any service.
@main
struct ApusSidecar: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apus-sidecar",
        abstract: "Service-mesh sidecar: outbound calls by service name, inbound limits, registration.")

    @Option(help: "Registry URL, or 'static' for upstreams from the config file.")
    var registry: String?
    @Option(name: .customLong("outbound-port"), parsing: .unconditional, help: "Port the app calls ($APUS_SIDECAR).")
    var outboundPort: Int?
    @Option(name: .customLong("inbound-port"), parsing: .unconditional, help: "Port mesh traffic for the app arrives on.")
    var inboundPort: Int?
    @Option(name: .customLong("app-port"), parsing: .unconditional, help: "The app's own port (inbound traffic goes there).")
    var appPort: Int?
    @Option(name: .customLong("app-address"), help: "The app's address (default 127.0.0.1; its namespace's address when it has one).")
    var appAddress: String?
    @Option(name: .customLong("outbound-address"), help: "Address the outbound listener binds (default --address): where the app reaches its sidecar.")
    var outboundAddress: String?
    @Option(name: .customLong("app-protocol"), help: "http, grpc or thrift.")
    var appProtocol: String?
    @Option(name: .customLong("admin-port"), parsing: .unconditional, help: "Admin port: /metrics, /healthz, /upstreams.")
    var adminPort: Int?
    @Option(help: "Service name to register the app under.")
    var service: String?
    @Option(name: .customLong("instance-id"), help: "Endpoint id in the registry (default address:port).")
    var instanceID: String?
    @Flag(name: .customLong("no-register"), help: "Do not register the app.")
    var noRegister = false
    @Option(help: "YAML configuration file (reloaded on SIGHUP).")
    var config: String?
    @Option(help: "Address to listen on and register.")
    var address: String?
    @Option(name: .customLong("event-loops"), parsing: .unconditional, help: "Event loop threads (default 1).")
    var eventLoops: Int?
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    /// The file (if any) with the flags on top.
    func loadConfig() throws -> SidecarConfig {
        var loaded = SidecarConfig()
        if let config {
            let text: String
            do {
                text = try String(contentsOfFile: config, encoding: .utf8)
            } catch {
                throw ValidationError("cannot read --config \(config): \(error.localizedDescription)")
            }
            do {
                loaded = try SidecarConfig.parse(yaml: text)
            } catch {
                throw ValidationError("\(config): \(error)")
            }
        }
        // Port options take negative values as values (not as flags), so the range is checked here.
        for (flag, port) in [("--outbound-port", outboundPort), ("--inbound-port", inboundPort), ("--app-port", appPort), ("--admin-port", adminPort)] {
            if let port, !(0...65535).contains(port) { throw ValidationError("\(flag) must be a port number (0-65535), got \(port)") }
        }
        if let registry { loaded.registry = registry }
        if let outboundPort { loaded.outboundPort = outboundPort }
        if let inboundPort { loaded.inboundPort = inboundPort }
        if let appPort { loaded.appPort = appPort }
        if let appAddress { loaded.appAddress = appAddress }
        if let outboundAddress { loaded.outboundAddress = outboundAddress }
        if let appProtocol {
            guard ["http", "grpc", "thrift"].contains(appProtocol) else { throw ValidationError("--app-protocol must be http, grpc or thrift") }
            loaded.appProtocol = appProtocol
        }
        if let adminPort { loaded.adminPort = adminPort }
        if let service { loaded.service = service }
        if let instanceID { loaded.instanceID = instanceID }
        if noRegister { loaded.register = false }
        if let address { loaded.address = address }
        if let eventLoops {
            guard eventLoops >= 1 else { throw ValidationError("--event-loops must be at least 1") }
            loaded.eventLoops = eventLoops
        }
        guard loaded.registry != nil else { throw ValidationError("--registry is required (a registry URL, or 'static')") }
        guard loaded.outboundPort != nil || loaded.inboundPort != nil else {
            throw ValidationError("--outbound-port or --inbound-port is required")
        }
        if loaded.inboundPort != nil, loaded.appPort == nil { throw ValidationError("--inbound-port needs --app-port") }
        if loaded.register, loaded.inboundPort != nil, loaded.service == nil {
            throw ValidationError("--service is required to register (or pass --no-register)")
        }
        return loaded
    }

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var logger = Logger(label: "apus-sidecar")
        let initial = try loadConfig()
        if let service = initial.service { logger[metadataKey: "service"] = "\(service)" }

        let export = PrometheusExport(help: SidecarMetricHelp.texts, durationBuckets: [
            .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
            .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(30),
        ])
        export.bootstrap()
        let metricsRegistry = export.registry

        let registry = try registryFor(url: initial.registry!, config: initial) { url in
            // apusd hands the sidecars it starts a token that may register their own service only.
            try makeServiceRegistry(url: url, token: ProcessInfo.processInfo.environment["APUS_REGISTRY_TOKEN"], logger: logger)
        }
        // Signals are handled on a dispatch queue; the default actions are switched off first.
        let signals = AsyncStream<Int32>.makeStream()
        var sources: [any DispatchSourceSignal] = []
        for sig in [SIGHUP, SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            let continuation = signals.continuation
            source.setEventHandler { continuation.yield(sig) }
            source.resume()
            sources.append(source)
        }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: initial.eventLoops)
        let sidecar = Sidecar(config: initial, registry: registry, group: group, metrics: metricsRegistry, logger: logger)
        let ports: Sidecar.BoundPorts
        do {
            ports = try await sidecar.start()
        } catch {
            logger.critical("cannot start", metadata: ["error": "\(error)"])
            try? await group.shutdownGracefully()
            throw ExitCode(1)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        // One line on stdout with the bound ports (useful with port 0), written unbuffered.
        FileHandle.standardOutput.write(Data("apus-sidecar ready \(String(decoding: try encoder.encode(ports), as: UTF8.self))\n".utf8))

        for await sig in signals.stream {
            if sig == SIGHUP {
                do {
                    let reloaded = try loadConfig()
                    try await sidecar.reload(reloaded)
                } catch {
                    logger.error("reload refused; keeping the running configuration", metadata: ["error": "\(error)"])
                }
                continue
            }
            logger.info("stopping", metadata: ["signal": "\(sig == SIGTERM ? "SIGTERM" : "SIGINT")"])
            break
        }
        await sidecar.shutdown()
        for source in sources { source.cancel() }
        try? await group.shutdownGracefully()
    }
}
