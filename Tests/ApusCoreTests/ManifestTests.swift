import ApusCore
import Testing

@Suite("apus.yaml validation")
struct ManifestTests {
    @Test func minimalPythonManifestGetsDefaults() throws {
        let m = try FunctionManifest.parse(yaml: "name: hello\nruntime: python3\n")
        #expect(m.name == "hello")
        #expect(m.runtime == .python3)
        #expect(m.handler == "main.handler")
        #expect(m.protocol == .http)
        #expect(m.concurrency == 10)
        #expect(m.scale == .init(min: 0, max: 5))
        #expect(m.timeout == .seconds(30))
        #expect(m.memory == 256 << 20)
        #expect(m.env.isEmpty)
    }

    @Test func fullManifest() throws {
        let m = try FunctionManifest.parse(yaml: """
            name: orders-api
            runtime: command
            command: ["./server", "--port", "$APUS_PORT"]
            protocol: http
            concurrency: 2
            scale: {min: 1, max: 4}
            timeout: 1500ms
            memory: 1Gi
            env:
              MODE: fast
              RETRIES: 3
            """)
        #expect(m.command == ["./server", "--port", "$APUS_PORT"])
        #expect(m.concurrency == 2)
        #expect(m.scale == .init(min: 1, max: 4))
        #expect(m.timeout == .milliseconds(1500))
        #expect(m.memory == 1 << 30)
        #expect(m.env == ["MODE": "fast", "RETRIES": "3"])
    }

    /// Each bad manifest must be refused with a message naming the key path and the reason.
    @Test(arguments: [
        ("name: a\nruntime: python3\nscael: {}\n", "scael: unknown key"),
        ("name: a\nruntime: python3\nscale: {min: 1, mx: 2}\n", "scale.mx: unknown key"),
        ("name: a\nruntime: python3\nconcurrency: zero\n", "concurrency: must be an integer (got \"zero\")"),
        ("name: a\nruntime: python3\nconcurrency: 0\n", "concurrency: must be between 1 and 10000"),
        ("name: a\nruntime: python3\ntimeout: 5 parsecs\n", "timeout: must be a duration"),
        ("name: a\nruntime: python3\nscale: {min: 3, max: 1}\n", "scale.max: must be ≥ scale.min"),
        ("name: a\nruntime: ruby\n", "runtime: must be one of python3, command (got \"ruby\")"),
        ("name: a\nruntime: command\n", "command: is required"),
        ("name: a\nruntime: command\ncommand: [[1]]\n", "command[0]: must be a string"),
        ("name: Bad_Name\nruntime: python3\n", "name: must be 1-63 characters"),
        ("runtime: python3\n", "name: is required"),
        ("name: a\nruntime: python3\nmemory: lots\n", "memory: must be a size"),
        ("name: a\nruntime: python3\nhandler: main\n", "handler: must be module.function"),
        ("name: a\nruntime: python3\nenv: {APUS_PORT: 1}\n", "env.APUS_PORT: APUS_ variables are set by the platform"),
        ("name: a\nruntime: python3\nprotocol: thrift\n", "thrift.service: is required for protocol: thrift"),
        ("name: a\nruntime: python3\nshedding: {interval: 1s}\n", "shedding.target: is required"),
        ("name: a\nruntime: python3\nscale: {max: 3, schedule: [{days: [mo], from: \"08:00\", to: \"20:00\", min: 1}]}\n", "scale.schedule[0].days: must name days"),
        ("name: a\nruntime: python3\nscale: {max: 3, schedule: [{from: \"8am\", to: \"20:00\", min: 1}]}\n", "scale.schedule[0].from: must be a UTC time"),
        ("name: a\nruntime: python3\nscale: {max: 3, schedule: [{from: \"08:00\", to: \"20:00\", min: 4}]}\n", "scale.schedule[0].min: is required"),
        ("name: a\nruntime: python3\nscale: {max: 3, schedule: [{from: \"08:00\", to: \"20:00\", min: 1, at: 2}]}\n", "scale.schedule[0].at: unknown key"),
        ("name: a\nruntime: python3\ntimeout: 1s\nshedding: {target: 5s}\n", "shedding.target: must be a duration between 1ms and the function's timeout"),
        ("name: a\nruntime: python3\nthrift: {service: S}\n", "thrift: is only for protocol: thrift"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: S, transport: http}\n", "thrift.transport: must be one of framed, buffered, header (got \"http\")"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: S, protocol: json}\n", "thrift.protocol: must be one of binary, compact (got \"json\")"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: \"9x\"}\n", "thrift.service: must be a Thrift service name"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: S, methods: [a, a]}\n", "thrift.methods: lists a twice"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: S, method: [a]}\n", "thrift.method: unknown key"),
        ("name: a\nruntime: python3\nprotocol: grpc\n", "grpc.services: is required for protocol: grpc"),
        ("name: a\nruntime: python3\ngrpc: {services: [a.B]}\n", "grpc: is only for protocol: grpc"),
        ("name: a\nruntime: python3\nprotocol: grpc\ngrpc: {services: []}\n", "grpc.services: must list"),
        ("name: a\nruntime: python3\nprotocol: grpc\ngrpc: {services: [ok.A, \"bad/name\"]}\n", "grpc.services[1]: must be a fully qualified service name"),
        ("name: a\nruntime: python3\nprotocol: grpc\ngrpc: {services: [a.B, a.B]}\n", "grpc.services: lists a.B twice"),
        ("name: a\nruntime: python3\nprotocol: grpc\ngrpc: {services: [grpc.health.v1.Health]}\n", "grpc.services[0]: grpc.health.v1.Health is served by the gateway itself"),
        ("name: a\nruntime: python3\nprotocol: grpc\ngrpc: {services: [a.B, grpc.reflection.v1alpha.ServerReflection]}\n", "grpc.services[1]: grpc.reflection.v1alpha.ServerReflection is served by the gateway itself"),
        ("name: a\nruntime: python3\nprotocol: grpc\ngrpc: {servces: [a.B]}\n", "grpc.servces: unknown key"),
        ("name: a\nruntime: python3\ncpu: lots\n", "cpu: must be cores such as 1, 0.5 or 2, or millicores such as 250m (got \"lots\")"),
        ("name: a\nruntime: python3\ncpu: 5m\n", "cpu: must be at least 10m (got 5m)"),
        ("name: a\nruntime: python3\npids: 4\n", "pids: must be between 8 and 65536"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: S, oneway: [zap, zap]}\n", "thrift.oneway: lists zap twice"),
        ("name: a\nruntime: python3\nprotocol: thrift\nthrift: {service: S, oneway: [\"a b\"]}\n", "thrift.oneway[0]: must be a method name"),
        ("- just\n- a list\n", "must be a mapping"),
        ("name: [unclosed\n", "is not valid YAML"),
    ])
    func rejectsWithKeyPath(yaml: String, expected: String) {
        do {
            _ = try FunctionManifest.parse(yaml: yaml)
            Issue.record("accepted a bad manifest: \(yaml)")
        } catch {
            #expect(error.code == .badRequest)
            #expect(error.message.hasPrefix("apus.yaml:"))
            #expect(error.message.contains(expected), "message was: \(error.message)")
        }
    }

    @Test func grpcManifest() throws {
        let m = try FunctionManifest.parse(yaml: "name: echo\nruntime: python3\nhandler: service.register\nprotocol: grpc\ngrpc: {services: [echo.Echo, other.v1.Things]}\n")
        #expect(m.protocol == .grpc)
        #expect(m.grpc?.services == ["echo.Echo", "other.v1.Things"])
        let data = try JSONEncoder().encode(m)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == m)
    }

    @Test func grpcServicesUnderGRPCPackageBelongToFunctions() throws {
        // Only the gateway's own health and reflection services are reserved; gRPC's interop service is not.
        let m = try FunctionManifest.parse(yaml: "name: interop\nruntime: python3\nprotocol: grpc\ngrpc: {services: [grpc.testing.TestService, grpc.health.v2.Health]}\n")
        #expect(m.grpc?.services == ["grpc.testing.TestService", "grpc.health.v2.Health"])
    }

    @Test func cpuPidsAndOnewayMethods() throws {
        let m = try FunctionManifest.parse(yaml: """
            name: calc
            runtime: python3
            protocol: thrift
            cpu: 250m
            pids: 64
            thrift: {service: Calculator, methods: [add, zap], oneway: [zap]}
            """)
        #expect(m.cpuMillis == 250 && m.pids == 64)
        #expect(m.thrift?.oneway == ["zap"])
        let data = try JSONEncoder().encode(m)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == m)
        let defaults = try FunctionManifest.parse(yaml: "name: a\nruntime: python3\n")
        #expect(defaults.cpuMillis == 1000 && defaults.pids == 512)
        #expect(try FunctionManifest.parse(yaml: "name: a\nruntime: python3\ncpu: 2\n").cpuMillis == 2000)
        #expect(try FunctionManifest.parse(yaml: "name: a\nruntime: python3\ncpu: 0.5\n").cpuMillis == 500)
    }

    @Test func versionsStoredBeforeCPUPidsAndOnewayStillDecode() throws {
        // A version stored by an earlier apusd has no cpu, pids or thrift.oneway: the defaults apply.
        let stored = """
            {"name":"calc","runtime":"python3","protocol":"thrift","concurrency":10,"scale":{"min":0,"max":5},
             "timeout":"30s","memory":"256Mi","env":{},
             "thrift":{"service":"Calculator","transport":"framed","protocol":"binary","methods":["add"]}}
            """
        let m = try JSONDecoder().decode(FunctionManifest.self, from: Data(stored.utf8))
        #expect(m.cpuMillis == FunctionManifest.defaultCPUMillis && m.pids == FunctionManifest.defaultPids)
        #expect(m.thrift?.oneway == [])
    }

    @Test(arguments: ["0", "0m", "-1", "abc", "1.5x", "m", ""])
    func badCPUIsRefused(text: String) {
        #expect(FunctionManifest.parseCPU(text) == nil)
    }

    @Test func thriftManifest() throws {
        let m = try FunctionManifest.parse(yaml: "name: calc\nruntime: python3\nprotocol: thrift\nthrift: {service: Calculator, transport: buffered, protocol: compact, methods: [add, zap]}\n")
        #expect(m.thrift == .init(service: "Calculator", transport: .buffered, protocol: .compact, methods: ["add", "zap"]))
        #expect(m.handler == "main.processor")
        let defaults = try FunctionManifest.parse(yaml: "name: calc\nruntime: command\ncommand: [./s]\nprotocol: thrift\nthrift: {service: Calculator}\n")
        #expect(defaults.thrift?.transport == .framed && defaults.thrift?.protocol == .binary)
        let data = try JSONEncoder().encode(m)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == m)
    }

    @Test func scheduledMinimums() throws {
        let m = try FunctionManifest.parse(yaml: "name: a\nruntime: python3\nscale:\n  max: 5\n  schedule:\n    - {days: [Mon, fri], from: \"08:00\", to: \"20:30\", min: 3}\n    - {from: \"22:00\", to: \"02:00\", min: 1}\n")
        #expect(m.scale.schedule == [.init(days: ["mon", "fri"], from: 480, to: 1230, min: 3), .init(days: [], from: 1320, to: 120, min: 1)])
        let data = try JSONEncoder().encode(m)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == m)
        let plain = try JSONEncoder().encode(try FunctionManifest.parse(yaml: "name: a\nruntime: python3\n"))
        #expect(!String(decoding: plain, as: UTF8.self).contains("schedule"), "stored manifests without schedules are unchanged")
    }

    @Test func sheddingManifest() throws {
        let m = try FunctionManifest.parse(yaml: "name: a\nruntime: python3\nshedding: {target: 50ms}\n")
        #expect(m.shedding == .init(target: .milliseconds(50), interval: .milliseconds(500)))
        let data = try JSONEncoder().encode(m)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == m)
    }

    @Test func manifestSurvivesJSONRoundTrip() throws {
        let m = try FunctionManifest.parse(yaml: "name: a\nruntime: python3\ntimeout: 2m\nmemory: 512Mi\nenv: {X: y}\n")
        let data = try JSONEncoder().encode(m)
        #expect(String(decoding: data, as: UTF8.self).contains("\"timeout\":\"2m\""))
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == m)
    }
}

@Suite("durations and sizes")
struct UnitParsingTests {
    @Test func durations() {
        #expect(Duration(humanReadable: "30s") == .seconds(30))
        #expect(Duration(humanReadable: "500ms") == .milliseconds(500))
        #expect(Duration(humanReadable: "1m30s") == .seconds(90))
        #expect(Duration(humanReadable: "2h") == .seconds(7200))
        #expect(Duration(humanReadable: "1.5") == .milliseconds(1500))
        #expect(Duration(humanReadable: "5 parsecs") == nil)
        #expect(Duration(humanReadable: "s") == nil)
        #expect(Duration(humanReadable: "") == nil)
        // Huge values are refused, not trapped on (schemathesis sent expiresIn: 10000000000000000000h).
        #expect(Duration(humanReadable: "10000000000000000000h") == nil)
        #expect(Duration(humanReadable: "1e300") == nil)
        #expect(Duration(humanReadable: "9000000000000000000ms9000000000000000000ms") == nil)
        #expect(Duration(humanReadable: "8760h") == .seconds(8760 * 3600))
        #expect(Duration.seconds(90).humanReadable == "90s")
        #expect(Duration.milliseconds(1500).humanReadable == "1500ms")
        #expect(Duration.seconds(120).humanReadable == "2m")
    }

    @Test func sizes() {
        #expect(ByteSize.parse("256Mi") == 256 << 20)
        #expect(ByteSize.parse("1Gi") == 1 << 30)
        #expect(ByteSize.parse("512M") == 512_000_000)
        #expect(ByteSize.parse("1024") == 1024)
        #expect(ByteSize.parse("-1Mi") == nil)
        #expect(ByteSize.parse("lots") == nil)
        #expect(ByteSize.format(256 << 20) == "256Mi")
        #expect(ByteSize.format(1000) == "1000")
    }
}

import Foundation

@Suite("scale override")
struct ScaleOverrideTests {
    @Test func boundsLeftOutKeepTheManifestsAndMinIsCappedByMax() {
        let scale = FunctionManifest.Scale(min: 1, max: 5)
        #expect(ScaleOverride(min: 3, max: nil).apply(to: scale) == (3, 5))
        #expect(ScaleOverride(min: nil, max: 10).apply(to: scale) == (1, 10))
        #expect(ScaleOverride(min: 4, max: 2).apply(to: scale) == (2, 2))
    }

    @Test func badBoundsAreRefusedWithTheField() {
        let scale = FunctionManifest.Scale(min: 0, max: 3)
        #expect(throws: ApusError.self) { try ScaleOverride(min: nil, max: nil).validate(against: scale) }
        do {
            try ScaleOverride(min: 9, max: nil).validate(against: scale)
            Issue.record("min above the manifest's max was accepted")
        } catch {
            #expect(error.message.contains("min 9 is above max 3"))
        }
        do {
            try ScaleOverride(min: -1, max: nil).validate(against: scale)
            Issue.record("negative min was accepted")
        } catch {
            #expect(error.message.hasPrefix("scale.min"))
        }
        do {
            try ScaleOverride(min: nil, max: 5000).validate(against: scale)
            Issue.record("max above the limit was accepted")
        } catch {
            #expect(error.message.hasPrefix("scale.max"))
        }
        #expect(throws: Never.self) { try ScaleOverride(min: 2, max: 8).validate(against: scale) }
    }
}
