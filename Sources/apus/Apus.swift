// apus: the command-line client of the Apus control API — deploy, version, release, invoke and read logs.
import ApusCore
import ArgumentParser
import Foundation
import NIOHTTP1

@main
struct Apus: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apus",
        abstract: "Deploy, release, invoke and inspect functions on an Apus platform.",
        subcommands: [Deploy.self, List.self, Get.self, Versions.self, Release.self, Delete.self, Invoke.self, Logs.self, Instances.self, Status.self, Scale.self,
                      Services.self, Submit.self, Tasks.self, Token.self, Secret.self])

    /// Global options may come before the subcommand (`apus --api URL list`): move them after it.
    static func main() async {
        var leading: [String] = []
        var rest = Array(CommandLine.arguments.dropFirst())
        while let first = rest.first, first.hasPrefix("-"), !["-h", "--help", "--version"].contains(first) {
            leading.append(rest.removeFirst())
            if first == "--api" || first == "--token", let value = rest.first {
                leading.append(value)
                rest.removeFirst()
            }
        }
        if let subcommand = rest.first {
            var path = [subcommand]
            var tail = Array(rest.dropFirst())
            // Nested commands (`apus tasks get ID`, `apus services resolve NAME`): the options go after the whole
            // command path.
            let nested: [String: [any ParsableCommand.Type]] = [
                "tasks": Tasks.configuration.subcommands, "services": Services.configuration.subcommands,
                "token": Token.configuration.subcommands, "secret": Secret.configuration.subcommands,
            ]
            if let subcommands = nested[subcommand], let next = tail.first,
               subcommands.contains(where: { $0.configuration.commandName == next }) {
                path.append(tail.removeFirst())
            }
            await main(path + leading + tail)
        } else {
            await main(leading)
        }
    }

    /// Runs a subcommand body, turning every failure into one line on stderr and exit status 1.
    static func guarded(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let error as CLIError {
            FileHandle.standardError.write(Data("apus: error: \(error.description)\n".utf8))
            throw ExitCode(1)
        } catch let error as ApusError {
            FileHandle.standardError.write(Data("apus: error: \(error.message)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct GlobalOptions: ParsableArguments {
    @Option(help: "Control API URL (default: $APUS_API, else ./.apus/ports.json, else http://127.0.0.1:7070).")
    var api: String?

    @Option(help: "Bearer token for the API (default: $APUS_TOKEN, else ./.apus/admin.token when the API is the one ./.apus/ports.json names).")
    var token: String?

    @Flag(help: "Print the API's JSON instead of tables.")
    var json = false

    var client: APIClient {
        let base = APIClient.resolveBase(api)
        return APIClient(base: base, token: APIClient.resolveToken(token, base: base))
    }

    func printJSON(_ data: Data) {
        FileHandle.standardOutput.write(data)
        if data.last != UInt8(ascii: "\n") { FileHandle.standardOutput.write(Data("\n".utf8)) }
    }
}

func out(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}

func age(_ date: Date) -> String {
    let seconds = Int(Date().timeIntervalSince(date))
    if seconds < 60 { return "\(max(seconds, 0))s ago" }
    if seconds < 3600 { return "\(seconds / 60)m ago" }
    if seconds < 86400 { return "\(seconds / 3600)h ago" }
    return "\(seconds / 86400)d ago"
}

func describe(_ release: ApusCore.Release) -> String {
    release.weights.map { "v\($0.version)=\($0.weight)%" }.joined(separator: " ")
}

struct Deploy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pack a function directory and create a new version.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Directory holding apus.yaml and the code.") var directory: String
    @Flag(help: "Keep traffic where it is (do not release the new version).") var noRelease = false

    func run() async throws {
        try await Apus.guarded {
            let archive = try CodeArchive.pack(directory: URL(fileURLWithPath: directory))
            let data = try await global.client.call(.POST, "/v1/functions\(noRelease ? "?release=false" : "")", body: archive, contentType: "application/gzip")
            if global.json { return global.printJSON(data) }
            struct Result: Decodable { var function: String; var version: FunctionVersion; var release: ApusCore.Release }
            let result = try global.client.decode(Result.self, data)
            out("deployed \(result.function) version \(result.version.number) (\(result.version.codeDigest.prefix(19))…)")
            out("traffic: \(describe(result.release))")
        }
    }
}

struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List functions.")
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/functions")
            if global.json { return global.printJSON(data) }
            struct Listing: Decodable { var functions: [FunctionRecord] }
            let listing = try global.client.decode(Listing.self, data)
            var table = Table("NAME", "LATEST", "TRAFFIC", "UPDATED")
            for f in listing.functions { table.add(f.name, "v\(f.latestVersion)", describe(f.release), age(f.updatedAt)) }
            out(listing.functions.isEmpty ? "no functions" : table.render())
        }
    }
}

struct FunctionDetail: Decodable {
    var name: String
    var latestVersion: Int
    var release: ApusCore.Release
    var createdAt: Date
    var updatedAt: Date
    var versions: [FunctionVersion]
}

func versionTable(_ versions: [FunctionVersion], release: ApusCore.Release) -> String {
    var table = Table("VERSION", "TRAFFIC", "RUNTIME", "CONCURRENCY", "SCALE", "TIMEOUT", "MEMORY", "CODE", "CREATED")
    for v in versions {
        let weight = release.weights.first { $0.version == v.number }?.weight ?? 0
        let m = v.manifest
        table.add("v\(v.number)", "\(weight)%", m.runtime.rawValue, "\(m.concurrency)", "\(m.scale.min)-\(m.scale.max)",
                  m.timeout.humanReadable, ByteSize.format(m.memory), String(v.codeDigest.prefix(19)), age(v.createdAt))
    }
    return table.render()
}

struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show one function.")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/functions/\(name)")
            if global.json { return global.printJSON(data) }
            let f = try global.client.decode(FunctionDetail.self, data)
            out("name:     \(f.name)")
            out("latest:   v\(f.latestVersion)")
            out("traffic:  \(describe(f.release))")
            out("created:  \(age(f.createdAt))")
            if let latest = f.versions.last {
                let m = latest.manifest
                out("runtime:  \(m.runtime.rawValue)\(m.handler.map { " (\($0))" } ?? "")\(m.command.map { " (\($0.joined(separator: " ")))" } ?? "")")
                out("protocol: \(m.protocol.rawValue)")
            }
            out("")
            out(versionTable(f.versions, release: f.release))
        }
    }
}

struct Versions: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List a function's versions.")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String

    func run() async throws {
        try await Apus.guarded {
            if global.json { return global.printJSON(try await global.client.call(.GET, "/v1/functions/\(name)/versions")) }
            // The function's detail carries its versions and the release that gives each its traffic share.
            let detail = try global.client.decode(FunctionDetail.self, try await global.client.call(.GET, "/v1/functions/\(name)"))
            out(versionTable(detail.versions, release: detail.release))
        }
    }
}

struct Release: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Split traffic across versions.",
        discussion: "apus release NAME 3            sends all traffic to version 3\napus release NAME 2=90 3=10    canary: 10% to version 3")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String
    @Argument(help: "VERSION or VERSION=WEIGHT; weights sum to 100.") var splits: [String]

    static func parse(_ splits: [String]) throws -> [ApusCore.Release.Weight] {
        guard !splits.isEmpty else { throw CLIError("name at least one VERSION or VERSION=WEIGHT") }
        var weights: [ApusCore.Release.Weight] = []
        for split in splits {
            let parts = split.split(separator: "=", omittingEmptySubsequences: false)
            let versionText = parts[0].hasPrefix("v") ? parts[0].dropFirst() : parts[0]
            guard let version = Int(versionText), version > 0 else { throw CLIError("'\(split)': version must be a positive number") }
            if parts.count == 1 {
                guard splits.count == 1 else { throw CLIError("'\(split)': give a weight (VERSION=WEIGHT) when splitting across versions") }
                weights.append(.init(version: version, weight: 100))
            } else {
                guard parts.count == 2, let weight = Int(parts[1]) else { throw CLIError("'\(split)': weight must be a number, as in 2=10") }
                weights.append(.init(version: version, weight: weight))
            }
        }
        return weights
    }

    func run() async throws {
        try await Apus.guarded {
            struct Body: Encodable { var weights: [ApusCore.Release.Weight] }
            let body = try JSONEncoder().encode(Body(weights: try Self.parse(splits)))
            let data = try await global.client.call(.PUT, "/v1/functions/\(name)/release", body: body)
            if global.json { return global.printJSON(data) }
            let release = try global.client.decode(ApusCore.Release.self, data)
            out("released \(name): \(describe(release))")
        }
    }
}

struct Delete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete a function, its versions and instances.")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String

    func run() async throws {
        try await Apus.guarded {
            _ = try await global.client.call(.DELETE, "/v1/functions/\(name)")
            if global.json { return out("{\"deleted\":\"\(name)\"}") }
            out("deleted \(name)")
        }
    }
}

struct Invoke: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Call a function through the gateway and print its answer.")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String
    @Option(help: "Request body, or @FILE to send a file's contents.") var data: String?
    @Option(help: "Path under the function, e.g. /items?id=3.") var path = "/"
    @Option(name: .customShort("H"), help: "Header 'Name: value' (repeatable).") var header: [String] = []
    @Option(name: .customShort("X"), help: "HTTP method (default GET, or POST with --data).") var method: String?
    @Flag(name: .shortAndLong, help: "Print the status line and headers too.") var include = false
    @Flag(help: "Send this CLI's API token to a function with auth: {tokens: true} (it needs scope invoke:<function>, invoke or admin; the gateway removes it before the instance). Refused for functions that take no Apus tokens, so a token never reaches function code.")
    var withToken = false

    func run() async throws {
        try await Apus.guarded {
            var headersFromToken: [(String, String)] = []  // the credential --with-token adds
            if withToken {
                struct Function: Decodable {
                    struct Version: Decodable {
                        struct Manifest: Decodable { struct Auth: Decodable { var tokens: Bool? }; var auth: Auth? }
                        var number: Int
                        var manifest: Manifest
                    }
                    var latestVersion: Int
                    var versions: [Version]
                }
                let function = try global.client.decode(Function.self, try await global.client.call(.GET, "/v1/functions/\(name)"))
                let latest = function.versions.first { $0.number == function.latestVersion }
                guard latest?.manifest.auth?.tokens == true else {
                    throw CLIError("function \(name) takes no Apus tokens (its apus.yaml has no auth: {tokens: true}); not sending one")
                }
                guard let token = global.client.token else { throw CLIError("--with-token: this CLI has no API token (APUS_TOKEN, --token)") }
                if header.contains(where: { $0.lowercased().hasPrefix("authorization:") }) {
                    throw CLIError("--with-token and -H 'Authorization: …' together: give one credential")
                }
                headersFromToken = [("Authorization", "Bearer \(token)")]
            }
            struct Info: Decodable { struct Gateway: Decodable { var http: String? }; var gateway: Gateway }
            let info = try global.client.decode(Info.self, try await global.client.call(.GET, "/v1/info"))
            guard let gateway = info.gateway.http else { throw CLIError("the platform reports no gateway listener") }
            var body: Data?
            if let data {
                if data.hasPrefix("@") {
                    guard let contents = FileManager.default.contents(atPath: String(data.dropFirst())) else {
                        throw CLIError("cannot read \(data.dropFirst())")
                    }
                    body = contents
                } else {
                    body = Data(data.utf8)
                }
            }
            var headers: [(String, String)] = headersFromToken
            for h in header {
                guard let colon = h.firstIndex(of: ":") else { throw CLIError("-H '\(h)': expected 'Name: value'") }
                headers.append((String(h[..<colon]).trimmingCharacters(in: .whitespaces), String(h[h.index(after: colon)...]).trimmingCharacters(in: .whitespaces)))
            }
            let verb = HTTPMethod(rawValue: (method ?? (body == nil ? "GET" : "POST")).uppercased())
            let suffix = path.hasPrefix("/") ? path : "/" + path
            let reply = try await global.client.send(verb, url: "\(gateway)/\(name)\(suffix)", headers: headers, body: body)
            if include {
                out("HTTP \(reply.status)")
                for h in reply.headers { out("\(h.name): \(h.value)") }
                out("")
            }
            FileHandle.standardOutput.write(reply.body)
            guard reply.status < 400 else { throw CLIError(APIClient.errorMessage(reply)) }
        }
    }
}

struct Logs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a function's logs (stdout/stderr of its instances).")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String
    @Flag(name: .shortAndLong, help: "Keep printing new lines as they arrive.") var follow = false
    @Option(parsing: .unconditional, help: "How many earlier lines to print.") var tail = 100

    func run() async throws {
        try await Apus.guarded {
            if follow {
                try await global.client.stream("/v1/functions/\(name)/logs?follow=true&tail=\(tail)")
            } else {
                let data = try await global.client.call(.GET, "/v1/functions/\(name)/logs?tail=\(tail)")
                FileHandle.standardOutput.write(data)
            }
        }
    }
}

struct Instances: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show a function's running instances.")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String

    func run() async throws {
        try await InstanceListing.show(name, global: global, withScaler: false)
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a function's instances (state, in-flight, age), its queue and the autoscaler's last decision.")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String

    func run() async throws {
        try await InstanceListing.show(name, global: global, withScaler: true)
    }
}

struct Scale: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Set a function's instance bounds without deploying (overrides scale.min/scale.max of every version).",
        discussion: "apus scale NAME --min 2 --max 10   keep 2 warm, allow 10\napus scale NAME --reset           back to the manifests' scale")
    @OptionGroup var global: GlobalOptions
    @Argument var name: String
    @Option(parsing: .unconditional, help: "Instances kept ready while the function is released (0 allows scale to zero).") var min: Int?
    @Option(parsing: .unconditional, help: "Most instances per version.") var max: Int?
    @Flag(help: "Remove the override: each version's manifest decides again.") var reset = false

    func validate() throws {
        if reset, min != nil || max != nil { throw ValidationError("--reset cannot be combined with --min or --max") }
        if !reset, min == nil, max == nil { throw ValidationError("give --min, --max or both (or --reset)") }
    }

    func run() async throws {
        try await Apus.guarded {
            let data: Data
            if reset {
                data = try await global.client.call(.DELETE, "/v1/functions/\(name)/scale")
            } else {
                var body: [String: Int] = [:]
                body["min"] = min
                body["max"] = max
                data = try await global.client.call(.PUT, "/v1/functions/\(name)/scale", body: try JSONEncoder().encode(body))
            }
            if global.json { return global.printJSON(data) }
            out(InstanceListing.ScaleStatus.render(try global.client.decode(InstanceListing.ScaleStatus.self, data)))
        }
    }
}

/// `GET /v1/functions/{name}/instances` as the CLI shows it.
struct InstanceListing: Decodable {
    struct Instance: Decodable { var id: String; var version: Int; var state: String; var port: Int?; var pid: Int32?; var inFlight: Int; var ageSeconds: Double }
    struct Scaler: Decodable {
        var version: Int; var desired: Int; var wanted: Int; var ready: Int
        var stableConcurrency: Double; var panicConcurrency: Double; var panicking: Bool; var limitedBy: String?; var ageSeconds: Double
        struct Score: Decodable { var shortSeconds: Int; var idleSeconds: Int; var rightSeconds: Int }
        var score: Score?
    }
    var queueDepth: Int
    var instances: [Instance]
    var autoscaler: [Scaler]?
    var scale: ScaleStatus?

    struct ScaleStatus: Decodable {
        struct Bounds: Decodable { var version: Int; var min: Int; var max: Int }
        struct Override: Decodable { var min: Int?; var max: Int? }
        var function: String
        var override: Override?
        var versions: [Bounds]

        static func render(_ status: ScaleStatus) -> String {
            let source: String
            if let o = status.override {
                source = "override: " + [o.min.map { "min \($0)" }, o.max.map { "max \($0)" }].compactMap { $0 }.joined(separator: ", ")
            } else {
                source = "from the manifests"
            }
            let bounds = status.versions.map { "v\($0.version) min \($0.min) max \($0.max)" }.joined(separator: "; ")
            return "scale \(status.function): \(bounds.isEmpty ? "no released version" : bounds) (\(source))"
        }
    }

    static func show(_ name: String, global: GlobalOptions, withScaler: Bool) async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/functions/\(name)/instances")
            if global.json { return global.printJSON(data) }
            out(render(try global.client.decode(InstanceListing.self, data), withScaler: withScaler))
        }
    }

    static func render(_ listing: InstanceListing, withScaler: Bool) -> String {
        var table = Table("INSTANCE", "VERSION", "STATE", "IN-FLIGHT", "PORT", "PID", "AGE")
        for i in listing.instances {
            table.add(i.id, "v\(i.version)", i.state, "\(i.inFlight)", i.port.map(String.init) ?? "-", i.pid.map { String($0) } ?? "-", "\(Int(i.ageSeconds))s")
        }
        var lines = [listing.instances.isEmpty ? "no instances (scaled to zero)" : table.render(), "queue: \(listing.queueDepth)"]
        if withScaler, let scale = listing.scale {
            lines.append(ScaleStatus.render(scale))
        }
        if withScaler {
            let decisions = listing.autoscaler ?? []
            if decisions.isEmpty { lines.append("autoscaler: no decision yet") }
            for d in decisions {
                let average = { (value: Double) in String(format: "%.2f", value) }
                lines.append("autoscaler v\(d.version): desired \(d.desired) (wanted \(d.wanted)\(d.limitedBy.map { ", limited by \($0)" } ?? "")), "
                    + "ready \(d.ready), concurrency \(average(d.stableConcurrency)) stable / \(average(d.panicConcurrency)) panic"
                    + "\(d.panicking ? ", PANIC" : ""), \(Int(d.ageSeconds))s ago")
                if let score = d.score {
                    let total = score.shortSeconds + score.idleSeconds + score.rightSeconds
                    let share = total == 0 ? 100 : score.rightSeconds * 100 / total
                    lines.append("  score v\(d.version): \(share)% of \(total)s right-sized (short \(score.shortSeconds)s, idle \(score.idleSeconds)s)")
                }
            }
        }
        return lines.joined(separator: "\n")
    }
}
