// apus token: control-API tokens (admin only): create (the secret is printed once), list, revoke.
import ApusCore
import ArgumentParser
import Foundation

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage the control API's bearer tokens (needs an admin token).",
        subcommands: [TokenCreate.self, TokenList.self, TokenRevoke.self])
}

/// A token as `GET /v1/tokens` shows it.
struct TokenInfo: Decodable {
    var id: String
    var name: String
    var scopes: [String]
    var createdAt: Date
    var expiresAt: Date?
    var expired: Bool
}

struct TokenCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Make a token and print its secret (shown this once only).",
        discussion: "apus token create ci --scope deploy --scope read --expires 720h\nScopes: admin, deploy, read, invoke, invoke:<function>, tasks, secrets, registry:<service>.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Token name (a-z, 0-9, '.', '-', '_').") var name: String
    @Option(name: .customLong("scope"), help: "A scope the token holds (repeatable).") var scopes: [String] = []
    @Option(help: "Lifetime, e.g. 30m, 24h, 720h (default: no expiry).") var expires: String?

    func validate() throws {
        if scopes.isEmpty { throw ValidationError("give at least one --scope (admin, deploy, read, invoke, invoke:<function>, tasks, secrets, registry:<service>)") }
    }

    func run() async throws {
        try await Apus.guarded {
            var body: [String: Any] = ["name": name, "scopes": scopes]
            if let expires { body["expiresIn"] = expires }
            let data = try await global.client.call(.POST, "/v1/tokens", body: try JSONSerialization.data(withJSONObject: body))
            if global.json { return global.printJSON(data) }
            struct Created: Decodable { var token: TokenInfo; var secret: String }
            let created = try global.client.decode(Created.self, data)
            out(created.secret)
            FileHandle.standardError.write(Data("apus: token \(created.token.name) (\(created.token.scopes.joined(separator: ", "))\(created.token.expiresAt.map { ", expires \(ISO8601DateFormatter().string(from: $0))" } ?? "")): the secret above is shown this once\n".utf8))
        }
    }
}

struct TokenList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List tokens (names, scopes, expiry; never secrets).")
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/tokens")
            if global.json { return global.printJSON(data) }
            struct Listing: Decodable { var tokens: [TokenInfo] }
            let listing = try global.client.decode(Listing.self, data)
            var table = Table("NAME", "SCOPES", "CREATED", "EXPIRES")
            let iso = ISO8601DateFormatter()
            for t in listing.tokens {
                table.add(t.name, t.scopes.joined(separator: ","), age(t.createdAt),
                          t.expired ? "expired" : (t.expiresAt.map { iso.string(from: $0) } ?? "never"))
            }
            out(listing.tokens.isEmpty ? "no tokens" : table.render())
        }
    }
}

struct TokenRevoke: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "revoke", abstract: "Revoke a token: calls with it are refused from now on.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Token name.") var name: String

    func run() async throws {
        try await Apus.guarded {
            _ = try await global.client.call(.DELETE, "/v1/tokens/\(name)")
            if global.json { return out("{\"revoked\":\"\(name)\"}") }
            out("revoked \(name)")
        }
    }
}
