import ApusMesh
import ArgumentParser
import Foundation

/// `apus services`: what the service registry holds (`GET /v1/registry/services`), and `apus services resolve NAME`.
struct Services: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the service registry's services and endpoints, with health and lease expiry.",
        subcommands: [ServicesList.self, ServicesResolve.self],
        defaultSubcommand: ServicesList.self)
}

func expiresIn(_ endpoint: RegisteredEndpoint) -> String {
    guard let seconds = endpoint.expiresInSeconds else { return "-" }
    return seconds < 10 ? String(format: "%.1fs", seconds) : "\(Int(seconds))s"
}

func endpointTable(_ snapshots: [ServiceSnapshot]) -> String {
    var table = Table("SERVICE", "ENDPOINT", "ADDRESS", "PROTOCOL", "WEIGHT", "ZONE", "HEALTH", "EXPIRES-IN")
    for snapshot in snapshots {
        for registered in snapshot.endpoints {
            let e = registered.endpoint
            let host = e.address.contains(":") ? "[\(e.address)]" : e.address
            table.add(snapshot.name, e.id, "\(host):\(e.port)", e.protocol, "\(e.weight)", e.zone ?? "-",
                      e.healthy ? "healthy" : "unhealthy", expiresIn(registered))
        }
    }
    return table.render()
}

struct ServicesList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List every registered service and its endpoints (the default).")
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/registry/services")
            if global.json { return global.printJSON(data) }
            struct Listing: Decodable { var services: [ServiceSnapshot] }
            let listing = try global.client.decode(Listing.self, data)
            out(listing.services.isEmpty ? "no services registered" : endpointTable(listing.services))
        }
    }
}

struct ServicesResolve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resolve", abstract: "Resolve a service name to its endpoints (exit status 1 when none is registered).")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Mesh service name, e.g. payments.refund.") var name: String

    func run() async throws {
        try await Apus.guarded {
            let path = "/v1/registry/services/" + (name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/"))) ?? name)
            let data = try await global.client.call(.GET, path)
            let snapshot = try global.client.decode(ServiceSnapshot.self, data)
            if global.json {
                global.printJSON(data)
            } else if !snapshot.endpoints.isEmpty {
                out(endpointTable([snapshot]))
            }
            if snapshot.endpoints.isEmpty { throw CLIError("no endpoints registered for \(name)") }
        }
    }
}
