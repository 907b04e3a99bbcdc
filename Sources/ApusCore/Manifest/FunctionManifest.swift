/// A function's declared configuration, read from `apus.yaml` in its directory.
/// Every field has a default so a minimal manifest is just `name` and `runtime`.
public struct FunctionManifest: Codable, Hashable, Sendable {
    public enum Runtime: String, Codable, Hashable, Sendable, CaseIterable {
        case python3
        case command
    }

    public enum WireProtocol: String, Codable, Hashable, Sendable, CaseIterable {
        case http
        case grpc
        case thrift
    }

    /// The most instances one function version may have (`scale.max`).
    public static let maxInstancesLimit = 1000

    public struct Scale: Codable, Hashable, Sendable {
        public var min: Int
        public var max: Int
        /// Higher minimums for windows of the week (tidal traffic).
        public var schedule: [Window]

        /// At least `min` instances on `days` (mon…sun; empty: every day) between `from` and `to`, minutes after
        /// midnight UTC; `to` before `from` spans midnight.
        public struct Window: Codable, Hashable, Sendable {
            public var days: [String]
            public var from: Int
            public var to: Int
            public var min: Int

            public init(days: [String], from: Int, to: Int, min: Int) {
                self.days = days
                self.from = from
                self.to = to
                self.min = min
            }
        }

        public init(min: Int = 0, max: Int = 5, schedule: [Window] = []) {
            self.min = min
            self.max = max
            self.schedule = schedule
        }

        enum CodingKeys: String, CodingKey { case min, max, schedule }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            min = try c.decode(Int.self, forKey: .min)
            max = try c.decode(Int.self, forKey: .max)
            schedule = try c.decodeIfPresent([Window].self, forKey: .schedule) ?? []
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(min, forKey: .min)
            try c.encode(max, forKey: .max)
            if !schedule.isEmpty { try c.encode(schedule, forKey: .schedule) }
        }
    }

    /// What a `protocol: grpc` function serves.
    public struct GRPCSettings: Codable, Hashable, Sendable {
        /// Fully qualified service names (`package.Service`) the gateway routes to this function.
        public var services: [String]

        /// The service the gateway answers itself: health of every function (`grpc.health.v1`).
        public static let healthService = "grpc.health.v1.Health"
        /// The services the gateway answers itself: server reflection, both published versions.
        public static let reflectionServices = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
        /// Exactly what no function may declare; every other service, `grpc.*` included (`grpc.testing.TestService`
        /// of gRPC's interop suite, say), belongs to the function that lists it.
        public static let gatewayServices: Set<String> = Set([healthService] + reflectionServices)

        public init(services: [String]) {
            self.services = services
        }
    }

    /// What a `protocol: thrift` function serves and how its instances frame messages.
    public struct ThriftSettings: Codable, Hashable, Sendable {
        public enum Transport: String, Codable, Hashable, Sendable, CaseIterable {
            /// 4-byte length before each message.
            case framed
            /// Messages back to back, delimited by their own structure.
            case buffered
            /// THeader (magic 0x0FFF) frames.
            case header
        }

        public enum Encoding: String, Codable, Hashable, Sendable, CaseIterable {
            case binary
            case compact
        }

        /// The Thrift service name: `Service:method` (multiplexed) calls route by it.
        public var service: String
        public var transport: Transport
        public var `protocol`: Encoding
        /// Methods plain (not multiplexed) calls may reach this function by; unique across functions.
        public var methods: [String]
        /// The IDL's `oneway` methods. Some clients (Apache Thrift's Go library) send a oneway call as an ordinary
        /// CALL and read no reply; the gateway, which has no IDL, learns from this list not to wait for one.
        public var oneway: [String]

        public init(service: String, transport: Transport = .framed, protocol: Encoding = .binary, methods: [String] = [],
                    oneway: [String] = []) {
            self.service = service
            self.transport = transport
            self.protocol = `protocol`
            self.methods = methods
            self.oneway = oneway
        }

        enum CodingKeys: String, CodingKey { case service, transport, `protocol`, methods, oneway }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            service = try c.decode(String.self, forKey: .service)
            transport = try c.decode(Transport.self, forKey: .transport)
            `protocol` = try c.decode(Encoding.self, forKey: .protocol)
            methods = try c.decode([String].self, forKey: .methods)
            oneway = try c.decodeIfPresent([String].self, forKey: .oneway) ?? []  // versions stored before `oneway`
        }
    }

    /// CoDel-style load shedding: refuse new requests early while queued ones wait longer than `target` for a
    /// whole `interval`.
    public struct Shedding: Codable, Hashable, Sendable {
        public var target: Duration
        public var interval: Duration

        public init(target: Duration, interval: Duration) {
            self.target = target
            self.interval = interval
        }

        enum CodingKeys: String, CodingKey { case target, interval }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            guard let target = Duration(humanReadable: try c.decode(String.self, forKey: .target)),
                  let interval = Duration(humanReadable: try c.decode(String.self, forKey: .interval)) else {
                throw DecodingError.dataCorruptedError(forKey: .target, in: c, debugDescription: "bad shedding durations")
            }
            self.target = target
            self.interval = interval
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(target.humanReadable, forKey: .target)
            try c.encode(interval.humanReadable, forKey: .interval)
        }
    }

    public var name: String
    public var runtime: Runtime
    /// Python: `module.function`.
    public var handler: String?
    /// Command runtime: argv of the server to run.
    public var command: [String]?
    public var `protocol`: WireProtocol
    /// Requests one instance serves at once.
    public var concurrency: Int
    public var scale: Scale
    /// Per-invocation deadline.
    public var timeout: Duration
    /// Memory limit in bytes: resident memory (the instance's cgroup), its `/tmp` included.
    public var memory: Int64
    /// CPU in thousandths of a core (`cpu: 500m` = 500, `cpu: 2` = 2000): the instance's CFS quota.
    public var cpuMillis: Int
    /// Processes and threads an instance may have at once.
    public var pids: Int
    public var env: [String: String]
    /// Environment variables whose values come from stored secrets (`secrets:`), by variable name. Only the
    /// references are kept here; values are decrypted when an instance starts.
    public var secrets: [String: SecretReference]
    /// Set exactly when `protocol` is `grpc`.
    public var grpc: GRPCSettings?
    /// Set exactly when `protocol` is `thrift`.
    public var thrift: ThriftSettings?
    /// Off unless set.
    public var shedding: Shedding?
    /// Service-mesh membership (`mesh: {service, sidecar}`); nil: not in discovery.
    public var mesh: MeshSettings?
    /// Asynchronous task settings (`async:`); nil: the defaults apply to tasks, and Thrift oneway calls stay calls.
    public var async: AsyncSettings?
    /// What the instance's network may reach (`network: {egress}`); nil: `egress: all`.
    public var network: NetworkSettings?
    /// Who may invoke the function through the gateway (`auth:`); nil: open.
    public var auth: AuthSettings?

    public init(
        name: String,
        runtime: Runtime,
        handler: String? = nil,
        command: [String]? = nil,
        protocol: WireProtocol = .http,
        concurrency: Int = 10,
        scale: Scale = Scale(),
        timeout: Duration = .seconds(30),
        memory: Int64 = 256 * 1024 * 1024,
        cpuMillis: Int = FunctionManifest.defaultCPUMillis,
        pids: Int = FunctionManifest.defaultPids,
        env: [String: String] = [:],
        grpc: GRPCSettings? = nil,
        thrift: ThriftSettings? = nil,
        shedding: Shedding? = nil,
        mesh: MeshSettings? = nil,
        async: AsyncSettings? = nil,
        network: NetworkSettings? = nil,
        secrets: [String: SecretReference] = [:],
        auth: AuthSettings? = nil
    ) {
        self.name = name
        self.runtime = runtime
        self.handler = handler
        self.command = command
        self.protocol = `protocol`
        self.concurrency = concurrency
        self.scale = scale
        self.timeout = timeout
        self.memory = memory
        self.cpuMillis = cpuMillis
        self.pids = pids
        self.env = env
        self.secrets = secrets
        self.grpc = grpc
        self.thrift = thrift
        self.shedding = shedding
        self.mesh = mesh
        self.async = async
        self.network = network
        self.auth = auth
    }

    enum CodingKeys: String, CodingKey {
        case name, runtime, handler, command, `protocol`, concurrency, scale, timeout, memory, cpu, pids, env, secrets, grpc, thrift, shedding, mesh, async, network, auth
    }

    /// One core unless the manifest says otherwise.
    public static let defaultCPUMillis = 1000
    /// Enough for a threaded server (a JVM starts ~30 threads, a gRPC server one per call in flight).
    public static let defaultPids = 512

    /// Parses a CPU amount: `500m` (millicores), `1`, `0.5`, `2.25` (cores); nil when malformed or under 1m.
    public static func parseCPU(_ text: String) -> Int? {
        if text.hasSuffix("m") {
            guard let millis = Int(text.dropLast()), millis >= 1 else { return nil }
            return millis
        }
        guard let cores = Double(text), cores.isFinite, cores > 0, cores <= 1_000_000 else { return nil }
        let millis = Int((cores * 1000).rounded())
        return millis >= 1 ? millis : nil
    }

    /// `cpuMillis` as written in a manifest: whole cores as `2`, anything else as `500m`.
    public static func formatCPU(_ millis: Int) -> String {
        millis % 1000 == 0 ? String(millis / 1000) : "\(millis)m"
    }

    // Durations and sizes are stored in their human form so stored versions read like the manifest.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        runtime = try c.decode(Runtime.self, forKey: .runtime)
        handler = try c.decodeIfPresent(String.self, forKey: .handler)
        command = try c.decodeIfPresent([String].self, forKey: .command)
        `protocol` = try c.decode(WireProtocol.self, forKey: .protocol)
        concurrency = try c.decode(Int.self, forKey: .concurrency)
        scale = try c.decode(Scale.self, forKey: .scale)
        let timeoutText = try c.decode(String.self, forKey: .timeout)
        guard let timeout = Duration(humanReadable: timeoutText) else {
            throw DecodingError.dataCorruptedError(forKey: .timeout, in: c, debugDescription: "bad duration \(timeoutText)")
        }
        self.timeout = timeout
        let memoryText = try c.decode(String.self, forKey: .memory)
        guard let memory = ByteSize.parse(memoryText) else {
            throw DecodingError.dataCorruptedError(forKey: .memory, in: c, debugDescription: "bad size \(memoryText)")
        }
        self.memory = memory
        if let cpuText = try c.decodeIfPresent(String.self, forKey: .cpu) {
            guard let cpu = Self.parseCPU(cpuText) else {
                throw DecodingError.dataCorruptedError(forKey: .cpu, in: c, debugDescription: "bad cpu \(cpuText)")
            }
            cpuMillis = cpu
        } else {
            cpuMillis = Self.defaultCPUMillis  // versions stored before `cpu:` existed
        }
        pids = try c.decodeIfPresent(Int.self, forKey: .pids) ?? Self.defaultPids
        env = try c.decode([String: String].self, forKey: .env)
        secrets = try c.decodeIfPresent([String: SecretReference].self, forKey: .secrets) ?? [:]  // versions stored before `secrets:`
        grpc = try c.decodeIfPresent(GRPCSettings.self, forKey: .grpc)
        thrift = try c.decodeIfPresent(ThriftSettings.self, forKey: .thrift)
        shedding = try c.decodeIfPresent(Shedding.self, forKey: .shedding)
        mesh = try c.decodeIfPresent(MeshSettings.self, forKey: .mesh)
        self.async = try c.decodeIfPresent(AsyncSettings.self, forKey: .async)
        network = try c.decodeIfPresent(NetworkSettings.self, forKey: .network)
        auth = try c.decodeIfPresent(AuthSettings.self, forKey: .auth)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(runtime, forKey: .runtime)
        try c.encodeIfPresent(handler, forKey: .handler)
        try c.encodeIfPresent(command, forKey: .command)
        try c.encode(`protocol`, forKey: .protocol)
        try c.encode(concurrency, forKey: .concurrency)
        try c.encode(scale, forKey: .scale)
        try c.encode(timeout.humanReadable, forKey: .timeout)
        try c.encode(ByteSize.format(memory), forKey: .memory)
        try c.encode(Self.formatCPU(cpuMillis), forKey: .cpu)
        try c.encode(pids, forKey: .pids)
        try c.encode(env, forKey: .env)
        if !secrets.isEmpty { try c.encode(secrets, forKey: .secrets) }
        try c.encodeIfPresent(grpc, forKey: .grpc)
        try c.encodeIfPresent(thrift, forKey: .thrift)
        try c.encodeIfPresent(shedding, forKey: .shedding)
        try c.encodeIfPresent(mesh, forKey: .mesh)
        try c.encodeIfPresent(async, forKey: .async)
        try c.encodeIfPresent(network, forKey: .network)
        try c.encodeIfPresent(auth, forKey: .auth)
    }
}
