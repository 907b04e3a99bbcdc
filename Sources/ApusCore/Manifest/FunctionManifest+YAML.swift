import Foundation
import Yams

extension FunctionManifest {
    /// The manifest's file name inside a function directory.
    public static let fileName = "apus.yaml"

    /// Parses and validates `apus.yaml` text. Every problem is reported with its key path, e.g.
    /// `apus.yaml: scale.max: must be an integer ≥ 1 (got "lots")`; unknown keys are rejected.
    public static func parse(yaml text: String) throws(ApusError) -> FunctionManifest {
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            throw ManifestReader.failure("", "is not valid YAML: \(error)")
        }
        guard let root, case .mapping(let mapping) = root else {
            throw ManifestReader.failure("", "must be a mapping of keys to values")
        }
        let reader = ManifestReader(mapping: mapping, path: "")
        try reader.rejectUnknownKeys(allowed: ["name", "runtime", "handler", "command", "protocol", "concurrency",
                                               "scale", "timeout", "memory", "cpu", "pids", "env", "secrets", "grpc", "thrift", "shedding",
                                               "mesh", "async", "network", "auth"])

        let name = try reader.requiredString("name")
        try validateName(name, key: "name")
        let runtimeText = try reader.requiredString("runtime")
        guard let runtime = Runtime(rawValue: runtimeText) else {
            throw ManifestReader.failure("runtime", "must be one of \(Runtime.allCases.map(\.rawValue).joined(separator: ", ")) (got \"\(runtimeText)\")")
        }
        var manifest = FunctionManifest(name: name, runtime: runtime)

        if let protocolText = try reader.optionalString("protocol") {
            guard let wire = WireProtocol(rawValue: protocolText) else {
                throw ManifestReader.failure("protocol", "must be one of \(WireProtocol.allCases.map(\.rawValue).joined(separator: ", ")) (got \"\(protocolText)\")")
            }
            manifest.protocol = wire
        }

        if let grpcMapping = try reader.optionalMapping("grpc") {
            guard manifest.protocol == .grpc else {
                throw ManifestReader.failure("grpc", "is only for protocol: grpc")
            }
            let grpc = ManifestReader(mapping: grpcMapping, path: "grpc")
            try grpc.rejectUnknownKeys(allowed: ["services"])
            guard let services = try grpc.optionalStringList("services"), !services.isEmpty else {
                throw ManifestReader.failure("grpc.services", "must list the gRPC services the function serves, e.g. [echo.Echo]")
            }
            for (index, service) in services.enumerated() where !isGRPCServiceName(service) {
                throw ManifestReader.failure("grpc.services[\(index)]", "must be a fully qualified service name such as pkg.Service (got \"\(service)\")")
            }
            if let duplicate = services.first(where: { service in services.filter { $0 == service }.count > 1 }) {
                throw ManifestReader.failure("grpc.services", "lists \(duplicate) twice")
            }
            for (index, service) in services.enumerated() where GRPCSettings.gatewayServices.contains(service) {
                throw ManifestReader.failure("grpc.services[\(index)]", "\(service) is served by the gateway itself (health and reflection); every other service, grpc.* included, can be a function's")
            }
            manifest.grpc = GRPCSettings(services: services)
        } else if manifest.protocol == .grpc {
            throw ManifestReader.failure("grpc.services", "is required for protocol: grpc (the gRPC services the function serves, e.g. [echo.Echo])")
        }

        if let thriftMapping = try reader.optionalMapping("thrift") {
            guard manifest.protocol == .thrift else {
                throw ManifestReader.failure("thrift", "is only for protocol: thrift")
            }
            let thrift = ManifestReader(mapping: thriftMapping, path: "thrift")
            try thrift.rejectUnknownKeys(allowed: ["service", "transport", "protocol", "methods", "oneway"])
            let service = try thrift.requiredString("service")
            guard isThriftIdentifier(service) else {
                throw ManifestReader.failure("thrift.service", "must be a Thrift service name such as Calculator (got \"\(service)\")")
            }
            var settings = ThriftSettings(service: service)
            if let text = try thrift.optionalString("transport") {
                guard let transport = ThriftSettings.Transport(rawValue: text) else {
                    throw ManifestReader.failure("thrift.transport", "must be one of \(ThriftSettings.Transport.allCases.map(\.rawValue).joined(separator: ", ")) (got \"\(text)\")")
                }
                settings.transport = transport
            }
            if let text = try thrift.optionalString("protocol") {
                guard let encoding = ThriftSettings.Encoding(rawValue: text) else {
                    throw ManifestReader.failure("thrift.protocol", "must be one of \(ThriftSettings.Encoding.allCases.map(\.rawValue).joined(separator: ", ")) (got \"\(text)\")")
                }
                settings.protocol = encoding
            }
            // Lists of Thrift method names, each a name and none twice.
            func methodList(_ key: String) throws(ApusError) -> [String]? {
                guard let methods = try thrift.optionalStringList(key) else { return nil }
                for (index, method) in methods.enumerated() where !isThriftIdentifier(method) {
                    throw ManifestReader.failure("thrift.\(key)[\(index)]", "must be a method name (got \"\(method)\")")
                }
                if let duplicate = methods.first(where: { method in methods.filter { $0 == method }.count > 1 }) {
                    throw ManifestReader.failure("thrift.\(key)", "lists \(duplicate) twice")
                }
                return methods
            }
            if let methods = try methodList("methods") { settings.methods = methods }
            if let oneway = try methodList("oneway") { settings.oneway = oneway }
            manifest.thrift = settings
        } else if manifest.protocol == .thrift {
            throw ManifestReader.failure("thrift.service", "is required for protocol: thrift (e.g. thrift: {service: Calculator, transport: framed, protocol: binary})")
        }

        switch runtime {
        case .python3:
            // HTTP functions name a handler(event, context); gRPC functions a register(server).
            let defaultHandler = switch manifest.protocol {
            case .http: "main.handler"
            case .grpc: "main.register"
            case .thrift: "main.processor"
            }
            let handler = try reader.optionalString("handler") ?? defaultHandler
            let parts = handler.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count >= 2, parts.allSatisfy({ isPythonIdentifier($0) }) else {
                throw ManifestReader.failure("handler", "must be module.function, e.g. main.handler (got \"\(handler)\")")
            }
            manifest.handler = handler
            if reader.has("command") {
                throw ManifestReader.failure("command", "is only for runtime: command")
            }
        case .command:
            guard let command = try reader.optionalStringList("command") else {
                throw ManifestReader.failure("command", "is required for runtime: command (a list, e.g. [\"./server\", \"--port\", \"8080\"])")
            }
            guard !command.isEmpty, !command[0].isEmpty else {
                throw ManifestReader.failure("command", "must name a program to run")
            }
            manifest.command = command
            if reader.has("handler") {
                throw ManifestReader.failure("handler", "is only for runtime: python3")
            }
        }

        if let concurrency = try reader.optionalInt("concurrency") {
            guard (1...10_000).contains(concurrency) else {
                throw ManifestReader.failure("concurrency", "must be between 1 and 10000 (got \(concurrency))")
            }
            manifest.concurrency = concurrency
        }

        if let scaleMapping = try reader.optionalMapping("scale") {
            let scale = ManifestReader(mapping: scaleMapping, path: "scale")
            try scale.rejectUnknownKeys(allowed: ["min", "max", "schedule"])
            let min = try scale.optionalInt("min") ?? manifest.scale.min
            let max = try scale.optionalInt("max") ?? Swift.max(manifest.scale.max, min)
            guard min >= 0 else { throw ManifestReader.failure("scale.min", "must be ≥ 0 (got \(min))") }
            guard max >= 1 else { throw ManifestReader.failure("scale.max", "must be ≥ 1 (got \(max))") }
            guard max >= min else {
                throw ManifestReader.failure("scale.max", "must be ≥ scale.min (got max \(max), min \(min))")
            }
            guard max <= FunctionManifest.maxInstancesLimit else {
                throw ManifestReader.failure("scale.max", "must be ≤ \(FunctionManifest.maxInstancesLimit) (got \(max))")
            }
            manifest.scale = Scale(min: min, max: max)
            for (index, window) in (try scale.optionalMappingList("schedule") ?? []).enumerated() {
                manifest.scale.schedule.append(try Self.scheduleWindow(window, index: index, max: max))
            }
        }

        if let timeoutText = try reader.optionalString("timeout") {
            guard let timeout = Duration(humanReadable: timeoutText) else {
                throw ManifestReader.failure("timeout", "must be a duration such as 500ms, 30s, 5m or 1h (got \"\(timeoutText)\")")
            }
            guard timeout >= .milliseconds(10), timeout <= .seconds(3600) else {
                throw ManifestReader.failure("timeout", "must be between 10ms and 1h (got \(timeoutText))")
            }
            manifest.timeout = timeout
        }

        if let memoryText = try reader.optionalString("memory") {
            guard let memory = ByteSize.parse(memoryText) else {
                throw ManifestReader.failure("memory", "must be a size such as 128Mi, 1Gi or 512M (got \"\(memoryText)\")")
            }
            guard memory >= 16 << 20 else {
                throw ManifestReader.failure("memory", "must be at least 16Mi (got \(memoryText))")
            }
            manifest.memory = memory
        }

        if let cpuText = try reader.optionalString("cpu") {
            guard let cpu = FunctionManifest.parseCPU(cpuText) else {
                throw ManifestReader.failure("cpu", "must be cores such as 1, 0.5 or 2, or millicores such as 250m (got \"\(cpuText)\")")
            }
            guard cpu >= 10 else {
                throw ManifestReader.failure("cpu", "must be at least 10m (got \(cpuText))")
            }
            manifest.cpuMillis = cpu
        }

        if let pids = try reader.optionalInt("pids") {
            guard (8...65_536).contains(pids) else {
                throw ManifestReader.failure("pids", "must be between 8 and 65536 processes and threads (got \(pids))")
            }
            manifest.pids = pids
        }

        if let sheddingMapping = try reader.optionalMapping("shedding") {
            let shedding = ManifestReader(mapping: sheddingMapping, path: "shedding")
            try shedding.rejectUnknownKeys(allowed: ["target", "interval"])
            func duration(_ key: String, default fallback: Duration?) throws(ApusError) -> Duration {
                guard let text = try shedding.optionalString(key) else {
                    guard let fallback else { throw ManifestReader.failure("shedding.\(key)", "is required, e.g. 50ms") }
                    return fallback
                }
                guard let value = Duration(humanReadable: text), value >= .milliseconds(1), value <= manifest.timeout else {
                    throw ManifestReader.failure("shedding.\(key)", "must be a duration between 1ms and the function's timeout (got \"\(text)\")")
                }
                return value
            }
            let target = try duration("target", default: nil)
            let interval = try duration("interval", default: min(.milliseconds(500), manifest.timeout))
            manifest.shedding = Shedding(target: target, interval: interval)
        }

        manifest.async = try asyncSettings(reader)

        if let envMapping = try reader.optionalMapping("env") {
            var env: [String: String] = [:]
            for (keyNode, valueNode) in envMapping {
                guard case .scalar(let key) = keyNode else {
                    throw ManifestReader.failure("env", "keys must be plain names")
                }
                guard isEnvironmentName(key.string) else {
                    throw ManifestReader.failure("env.\(key.string)", "is not a valid environment variable name")
                }
                guard !key.string.hasPrefix("APUS_") else {
                    throw ManifestReader.failure("env.\(key.string)", "APUS_ variables are set by the platform")
                }
                guard case .scalar(let value) = valueNode else {
                    throw ManifestReader.failure("env.\(key.string)", "must be a string, number or boolean")
                }
                env[key.string] = value.string
            }
            manifest.env = env
        }
        manifest.secrets = try parseSecrets(reader, env: manifest.env)
        manifest.mesh = try parseMesh(reader)
        manifest.network = try parseNetwork(reader, mesh: manifest.mesh)
        manifest.auth = try parseAuth(reader)
        return manifest
    }

    static let weekdays = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

    /// `{days: [mon, …], from: "08:00", to: "20:00", min: 3}` (UTC; `to` before `from` spans midnight; no `days`:
    /// every day).
    static func scheduleWindow(_ reader: ManifestReader, index: Int, max: Int) throws(ApusError) -> Scale.Window {
        let key = "scale.schedule[\(index)]"
        try reader.rejectUnknownKeys(allowed: ["days", "from", "to", "min"])
        var days: [String] = []
        for day in try reader.optionalStringList("days") ?? [] {
            guard weekdays.contains(day.lowercased()) else {
                throw ManifestReader.failure("\(key).days", "must name days as mon, tue, wed, thu, fri, sat, sun (got \"\(day)\")")
            }
            days.append(day.lowercased())
        }
        func minute(_ field: String) throws(ApusError) -> Int {
            let text = try reader.requiredString(field)
            let parts = text.split(separator: ":")
            guard parts.count == 2, let h = Int(parts[0]), let m = Int(parts[1]), (0...24).contains(h), (0...59).contains(m), h * 60 + m <= 1440 else {
                throw ManifestReader.failure("\(key).\(field)", "must be a UTC time such as \"08:00\" (got \"\(text)\")")
            }
            return h * 60 + m
        }
        let from = try minute("from")
        let to = try minute("to")
        guard from != to else { throw ManifestReader.failure(key, "from and to are the same time") }
        guard let min = try reader.optionalInt("min"), (1...max).contains(min) else {
            throw ManifestReader.failure("\(key).min", "is required: the instances to keep in the window, 1...scale.max (\(max))")
        }
        return Scale.Window(days: days, from: from, to: to, min: min)
    }

    /// A Thrift identifier: letters, digits, '_' and '.', not starting with a digit.
    public static func isThriftIdentifier(_ name: String) -> Bool {
        guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first), name.utf8.count <= 200 else { return false }
        return name.utf8.allSatisfy { byte in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".")
        }
    }

    /// `pkg.sub.Service` or `Service`: dot-separated identifiers of letters, digits and '_'.
    public static func isGRPCServiceName(_ name: String) -> Bool {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        return name.utf8.count <= 200 && parts.allSatisfy { part in
            guard let first = part.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
            return part.utf8.allSatisfy { byte in
                (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                    || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "_")
            }
        }
    }

    /// Function names are DNS labels so they work both as path prefixes and as host names.
    public static func isFunctionName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return (1...63).contains(bytes.count)
            && (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(bytes[0])
            && bytes.allSatisfy { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "-") }
            && bytes.last != UInt8(ascii: "-")
    }

    public static func validateName(_ name: String, key: String) throws(ApusError) {
        guard isFunctionName(name) else {
            throw ManifestReader.failure(key, "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-' (got \"\(name)\")")
        }
    }

    private static func isPythonIdentifier(_ s: Substring) -> Bool {
        guard let first = s.first, first == "_" || first.isLetter else { return false }
        return s.allSatisfy { $0 == "_" || $0.isLetter || $0.isNumber }
    }

    static func isEnvironmentName(_ s: String) -> Bool {
        guard let first = s.first, first == "_" || (first.isASCII && first.isLetter) else { return false }
        return s.allSatisfy { $0 == "_" || ($0.isASCII && ($0.isLetter || $0.isNumber)) }
    }
}

/// Reads typed values out of one YAML mapping, naming the full key path in every error.
struct ManifestReader {
    let mapping: Node.Mapping
    let path: String

    static func failure(_ key: String, _ reason: String) -> ApusError {
        let location = key.isEmpty ? "" : " \(key):"
        return ApusError(.badRequest, "\(FunctionManifest.fileName):\(location) \(reason)")
    }

    private func fullKey(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    private func value(_ key: String) -> Node? {
        for (k, v) in mapping {
            if case .scalar(let s) = k, s.string == key { return v }
        }
        return nil
    }

    func has(_ key: String) -> Bool { value(key) != nil }

    func rejectUnknownKeys(allowed: Set<String>) throws(ApusError) {
        for (k, _) in mapping {
            guard case .scalar(let s) = k else {
                throw Self.failure(path, "keys must be plain names")
            }
            if !allowed.contains(s.string) {
                throw Self.failure(fullKey(s.string), "unknown key (allowed here: \(allowed.sorted().joined(separator: ", ")))")
            }
        }
    }

    private func isNull(_ node: Node) -> Bool {
        if case .scalar(let s) = node, s.style == .plain, ["", "~", "null", "Null", "NULL"].contains(s.string) { return true }
        return false
    }

    func optionalString(_ key: String) throws(ApusError) -> String? {
        guard let node = value(key), !isNull(node) else { return nil }
        guard case .scalar(let s) = node else {
            throw Self.failure(fullKey(key), "must be a single value, not a list or mapping")
        }
        return s.string
    }

    func requiredString(_ key: String) throws(ApusError) -> String {
        guard let s = try optionalString(key), !s.isEmpty else {
            throw Self.failure(fullKey(key), "is required")
        }
        return s
    }

    func optionalBool(_ key: String) throws(ApusError) -> Bool? {
        guard let text = try optionalString(key) else { return nil }
        switch text {
        case "true": return true
        case "false": return false
        default: throw Self.failure(fullKey(key), "must be true or false (got \"\(text.prefix(80))\")")
        }
    }

    func optionalInt(_ key: String) throws(ApusError) -> Int? {
        guard let text = try optionalString(key) else { return nil }
        guard let n = Int(text) else {
            throw Self.failure(fullKey(key), "must be an integer (got \"\(text)\")")
        }
        return n
    }

    func optionalStringList(_ key: String) throws(ApusError) -> [String]? {
        guard let node = value(key), !isNull(node) else { return nil }
        guard case .sequence(let seq) = node else {
            throw Self.failure(fullKey(key), "must be a list of strings")
        }
        var items: [String] = []
        for (i, item) in seq.enumerated() {
            guard case .scalar(let s) = item else {
                throw Self.failure("\(fullKey(key))[\(i)]", "must be a string")
            }
            items.append(s.string)
        }
        return items
    }

    /// A list of mappings, each with its own reader (key path `key[i]`).
    func optionalMappingList(_ key: String) throws(ApusError) -> [ManifestReader]? {
        guard let node = value(key), !isNull(node) else { return nil }
        guard case .sequence(let seq) = node else {
            throw Self.failure(fullKey(key), "must be a list")
        }
        var readers: [ManifestReader] = []
        for (i, item) in seq.enumerated() {
            guard case .mapping(let m) = item else {
                throw Self.failure("\(fullKey(key))[\(i)]", "must be a mapping")
            }
            readers.append(ManifestReader(mapping: m, path: "\(fullKey(key))[\(i)]"))
        }
        return readers
    }

    func optionalMapping(_ key: String) throws(ApusError) -> Node.Mapping? {
        guard let node = value(key), !isNull(node) else { return nil }
        guard case .mapping(let m) = node else {
            throw Self.failure(fullKey(key), "must be a mapping")
        }
        return m
    }
}
