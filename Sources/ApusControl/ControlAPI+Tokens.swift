import ApusCore
import Foundation
import Hummingbird
import NIOCore

/// The token routes of the control API (IDL/apus-api.openapi.yaml, "tokens"), all `admin`: make a token (its secret
/// is in that one answer and nowhere else), list tokens (never a secret or its hash), revoke one.
extension ControlAPI {
    /// A token as the API shows it.
    struct TokenView: Codable {
        var id: String
        var name: String
        var scopes: [APIScope]
        var createdAt: Date
        var expiresAt: Date?
        var expired: Bool

        init(_ token: APIToken, now: Date = Date()) {
            id = token.id
            name = token.name
            scopes = token.scopes
            createdAt = token.createdAt
            expiresAt = token.expiresAt
            expired = token.isExpired(at: now)
        }
    }

    /// `{"name": N, "scopes": [S, …], "expiresIn": "24h"}`; unknown keys and bad values are refused naming them.
    static func parseTokenRequest(_ body: Data) throws(ApusError) -> (name: String, scopes: [APIScope], expiresIn: Duration?) {
        guard let object = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] else {
            throw ApusError(.badRequest, "token body must be a JSON object such as {\"name\": \"ci\", \"scopes\": [\"deploy\"], \"expiresIn\": \"24h\"}")
        }
        if let unknown = object.keys.sorted().first(where: { !["name", "scopes", "expiresIn"].contains($0) }) {
            throw ApusError(.badRequest, "\(unknown): unknown key (allowed: name, scopes, expiresIn)")
        }
        guard let name = object["name"] as? String else { throw ApusError(.badRequest, "name: is required (a string)") }
        guard let texts = object["scopes"] as? [String], !texts.isEmpty else {
            throw ApusError(.badRequest, "scopes: is required (a list such as [\"read\"])")
        }
        var scopes: [APIScope] = []
        for text in texts { scopes.append(try APIScope.parse(text)) }
        var expiresIn: Duration?
        if let value = object["expiresIn"], !(value is NSNull) {
            guard let text = value as? String, let duration = Duration(humanReadable: text), duration > .zero else {
                throw ApusError(.badRequest, "expiresIn: must be a duration such as 30m, 24h or 720h (got \(value))")
            }
            expiresIn = duration
        }
        return (name, scopes, expiresIn)
    }

    func addTokenRoutes(to router: Router<ControlRequestContext>, authority: TokenAuthority) {
        router.get("/v1/tokens") { _, _ in
            struct Listing: Codable { var tokens: [TokenView] }
            let now = Date()
            return try Self.json(Listing(tokens: try authority.list().map { TokenView($0, now: now) }))
        }

        router.post("/v1/tokens") { request, _ in
            var request = request
            let body = try await request.collectBody(upTo: 64 << 10)
            let (name, scopes, expiresIn) = try Self.parseTokenRequest(Data(buffer: body))
            let (token, secret) = try authority.create(name: name, scopes: scopes, expiresIn: expiresIn)
            struct Created: Codable { var token: TokenView; var secret: String }
            return try Self.json(Created(token: TokenView(token), secret: secret), status: .created)
        }

        router.delete("/v1/tokens/:name") { _, context in
            guard let name = context.parameters.get("name") else { throw ApusError(.badRequest, "missing token name") }
            try authority.revoke(name: name)
            return Response(status: .noContent)
        }
    }
}
