import ApusCore
import ApusStore
import Foundation
import Hummingbird
import NIOCore

/// The secret routes of the control API (IDL/apus-api.openapi.yaml, "secrets"): set one key of a secret (`secrets`
/// scope), list names and keys (`read` or `secrets`), delete a secret or one of its keys (`secrets`). No route
/// returns a value: values leave apusd only in the environment of the instances whose manifest names them.
extension ControlAPI {
    /// A secret as the API lists it: its keys and when each last changed.
    struct SecretView: Codable {
        struct Key: Codable {
            var key: String
            var updatedAt: Date
        }

        var name: String
        var keys: [Key]
        var updatedAt: Date
    }

    static func secretViews(_ keys: [SecretKeyInfo]) -> [SecretView] {
        var views: [SecretView] = []
        for info in keys {
            let key = SecretView.Key(key: info.key, updatedAt: info.updatedAt)
            if let last = views.indices.last, views[last].name == info.name {
                views[last].keys.append(key)
                views[last].updatedAt = max(views[last].updatedAt, info.updatedAt)
            } else {
                views.append(SecretView(name: info.name, keys: [key], updatedAt: info.updatedAt))
            }
        }
        return views
    }

    /// `{"value": "…"}`: a string, nothing else (unknown keys are refused, naming them). The value is never echoed.
    static func parseSecretValue(_ body: Data) throws(ApusError) -> String {
        guard let object = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] else {
            throw ApusError(.badRequest, "secret body must be a JSON object such as {\"value\": \"…\"}")
        }
        if let unknown = object.keys.sorted().first(where: { $0 != "value" }) {
            throw ApusError(.badRequest, "\(unknown.prefix(100)): unknown key (allowed: value)")
        }
        guard let value = object["value"] as? String else {
            throw ApusError(.badRequest, "value: is required (a string)")
        }
        return value
    }

    func addSecretRoutes(to router: Router<ControlRequestContext>, secrets: SecretVault) {
        router.get("/v1/secrets") { _, _ in
            struct Listing: Codable { var secrets: [SecretView] }
            return try Self.json(Listing(secrets: Self.secretViews(try secrets.list())))
        }

        router.put("/v1/secrets/:name/keys/:key") { request, context in
            guard let name = context.parameters.get("name"), let key = context.parameters.get("key") else {
                throw ApusError(.badRequest, "missing secret name or key")
            }
            try FunctionManifest.SecretReference.validate(secret: name, key: key)
            var request = request
            let body: ByteBuffer
            do {
                body = try await request.collectBody(upTo: 2 * SecretVault.maxValueBytes + 1024)
            } catch {
                throw ApusError(.tooLarge, "secret body exceeds \(2 * SecretVault.maxValueBytes + 1024) bytes")
            }
            let (info, created) = try secrets.set(name: name, key: key, value: try Self.parseSecretValue(Data(buffer: body)))
            struct Stored: Codable { var name: String; var key: String; var updatedAt: Date; var created: Bool }
            return try Self.json(Stored(name: info.name, key: info.key, updatedAt: info.updatedAt, created: created))
        }

        router.delete("/v1/secrets/:name") { _, context in
            guard let name = context.parameters.get("name") else { throw ApusError(.badRequest, "missing secret name") }
            try secrets.delete(name: name, key: nil)
            return Response(status: .noContent)
        }

        router.delete("/v1/secrets/:name/keys/:key") { _, context in
            guard let name = context.parameters.get("name"), let key = context.parameters.get("key") else {
                throw ApusError(.badRequest, "missing secret name or key")
            }
            try secrets.delete(name: name, key: key)
            return Response(status: .noContent)
        }
    }
}
