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

        public init(service: String, transport: Transport = .framed, protocol: Encoding = .binary, methods: [String] = []) {
            self.service = service
            self.transport = transport
            self.protocol = `protocol`
            self.methods = methods
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
    /// Memory limit in bytes.
    public var memory: Int64
    public var env: [String: String]
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
        env: [String: String] = [:],
        grpc: GRPCSettings? = nil,
        thrift: ThriftSettings? = nil,
        shedding: Shedding? = nil,
        mesh: MeshSettings? = nil,
        async: AsyncSettings? = nil
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
        self.env = env
        self.grpc = grpc
        self.thrift = thrift
        self.shedding = shedding
        self.mesh = mesh
        self.async = async
    }

    enum CodingKeys: String, CodingKey {
        case name, runtime, handler, command, `protocol`, concurrency, scale, timeout, memory, env, grpc, thrift, shedding, mesh, async
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
        env = try c.decode([String: String].self, forKey: .env)
        grpc = try c.decodeIfPresent(GRPCSettings.self, forKey: .grpc)
        thrift = try c.decodeIfPresent(ThriftSettings.self, forKey: .thrift)
        shedding = try c.decodeIfPresent(Shedding.self, forKey: .shedding)
        mesh = try c.decodeIfPresent(MeshSettings.self, forKey: .mesh)
        self.async = try c.decodeIfPresent(AsyncSettings.self, forKey: .async)
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
        try c.encode(env, forKey: .env)
        try c.encodeIfPresent(grpc, forKey: .grpc)
        try c.encodeIfPresent(thrift, forKey: .thrift)
        try c.encodeIfPresent(shedding, forKey: .shedding)
        try c.encodeIfPresent(mesh, forKey: .mesh)
        try c.encodeIfPresent(async, forKey: .async)
    }
}
