// apus secret: stored secrets, sealed at rest by apusd: set one key (value from stdin, --value or --from-file),
// list names and keys (never values), delete a secret or one key. Functions name them in apus.yaml's `secrets:`.
import ApusCore
import ArgumentParser
import Foundation

struct Secret: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage stored secrets (set and delete need the secrets or admin scope; values are never shown).",
        discussion: "A function gets one as an environment variable: secrets: {DB_PASSWORD: {secret: db, key: password}} in apus.yaml.\nInstances started after a change get the new value; running ones keep theirs.",
        subcommands: [SecretSet.self, SecretList.self, SecretDelete.self])
}

/// A secret name or key as a URL path segment.
private func segment(_ text: String) -> String {
    text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._"))) ?? text
}

struct SecretSet: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set", abstract: "Set one key of a secret (made if new), sealed at rest by apusd.",
        discussion: """
            The value comes from stdin (one trailing newline dropped), --value, or --from-file (its bytes as they are).
              printf %s "$PW" | apus secret set db password
              apus secret set db password --from-file ./password.txt
            """)
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Secret name (a-z, 0-9, '.', '-', '_').") var name: String
    @Argument(help: "Key in the secret (A-Z, a-z, 0-9, '.', '-', '_').") var key: String
    @Option(help: "The value (visible in the shell's history and the process list: prefer stdin or --from-file).") var value: String?
    @Option(help: "Read the value from this file.") var fromFile: String?

    func validate() throws {
        if value != nil, fromFile != nil { throw ValidationError("give --value or --from-file, not both") }
    }

    func readValue() throws -> String {
        if let value { return value }
        let data: Data
        if let fromFile {
            guard let contents = FileManager.default.contents(atPath: fromFile) else { throw CLIError("cannot read \(fromFile)") }
            data = contents
        } else {
            if isatty(STDIN_FILENO) != 0 {
                FileHandle.standardError.write(Data("apus: value of \(name)/\(key) (end with Ctrl-D): ".utf8))
            }
            var read = FileHandle.standardInput.readDataToEndOfFile()
            if read.last == UInt8(ascii: "\n") { read.removeLast() }
            if read.last == UInt8(ascii: "\r") { read.removeLast() }
            data = read
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw CLIError("the value must be UTF-8 text (it becomes an environment variable)")
        }
        return text
    }

    func run() async throws {
        try await Apus.guarded {
            let body = try JSONSerialization.data(withJSONObject: ["value": try readValue()])
            let data = try await global.client.call(.PUT, "/v1/secrets/\(segment(name))/keys/\(segment(key))", body: body)
            if global.json { return global.printJSON(data) }
            struct Stored: Decodable { var name: String; var key: String; var created: Bool }
            let stored = try global.client.decode(Stored.self, data)
            out("\(stored.created ? "set" : "updated") secret \(stored.name) key \(stored.key)")
        }
    }
}

struct SecretList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List secrets: names, keys and when they changed (never values).")
    @OptionGroup var global: GlobalOptions

    func run() async throws {
        try await Apus.guarded {
            let data = try await global.client.call(.GET, "/v1/secrets")
            if global.json { return global.printJSON(data) }
            struct Listing: Decodable {
                struct Secret: Decodable {
                    struct Key: Decodable { var key: String; var updatedAt: Date }
                    var name: String
                    var keys: [Key]
                }
                var secrets: [Secret]
            }
            let listing = try global.client.decode(Listing.self, data)
            var table = Table("NAME", "KEY", "UPDATED")
            for secret in listing.secrets {
                for key in secret.keys { table.add(secret.name, key.key, age(key.updatedAt)) }
            }
            out(listing.secrets.isEmpty ? "no secrets" : table.render())
        }
    }
}

struct SecretDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete", abstract: "Delete a secret (or one key of it).",
        discussion: "Running instances keep their values; instances of functions naming it fail to start afterwards.")
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Secret name.") var name: String
    @Option(help: "Delete only this key.") var key: String?

    func run() async throws {
        try await Apus.guarded {
            let path = "/v1/secrets/\(segment(name))" + (key.map { "/keys/\(segment($0))" } ?? "")
            _ = try await global.client.call(.DELETE, path)
            if global.json { return out("{\"deleted\":\"\(name)\(key.map { "/\($0)" } ?? "")\"}") }
            out("deleted secret \(name)\(key.map { " key \($0)" } ?? "")")
        }
    }
}
