@testable import ApusControl
import ApusCore
import ApusStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Synchronization
import Testing

@Suite("control API authentication")
struct ControlAuthTests {
    @Test func secretsAreRandomAndOnlyTheirHashIsKept() throws {
        let a = TokenSecret.generate(), b = TokenSecret.generate()
        #expect(a != b)
        #expect(a.hasPrefix("apus_") && a.count == 5 + 43)
        #expect(a.dropFirst(5).allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" })
        // SHA-256 of "abc" (FIPS 180-2).
        #expect(TokenSecret.hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(TokenSecret.bearer("Bearer apus_x") == "apus_x")
        #expect(TokenSecret.bearer("bearer   apus_x ") == "apus_x")
        #expect(TokenSecret.bearer("Basic dXNlcjpw") == nil)
        #expect(TokenSecret.bearer("Bearer ") == nil)
        #expect(TokenSecret.bearer(nil) == nil)

        let store = MemoryStore()
        let authority = try TokenAuthority(store: store)
        let (token, secret) = try authority.create(name: "ci", scopes: [.deploy, .deploy, .read])
        #expect(token.scopes == [.deploy, .read])
        #expect(try store.tokens().map(\.hash) == [TokenSecret.hash(secret)])
        #expect(!(try store.tokens()).contains { $0.hash.contains(secret) || secret.contains($0.hash) })
    }

    @Test func verdicts() throws {
        let now = Mutex(Date(timeIntervalSince1970: 1_800_000_000))
        let store = MemoryStore()
        let authority = try TokenAuthority(store: store, clock: { now.withLock { $0 } })
        let (token, secret) = try authority.create(name: "short", scopes: [.read], expiresIn: .seconds(60))
        #expect(authority.authenticate(authorization: "Bearer \(secret)") == .valid(token))
        #expect(authority.authenticate(authorization: nil) == .missing)
        #expect(authority.authenticate(authorization: "Bearer apus_nope") == .unknown)
        now.withLock { $0 = $0.addingTimeInterval(61) }
        #expect(authority.authenticate(authorization: "Bearer \(secret)") == .expired(token))
        // A new authority over the same store (a restart) knows the token; a revoked one is unknown at once.
        let (kept, keptSecret) = try authority.create(name: "kept", scopes: [.tasks])
        #expect(try TokenAuthority(store: store).authenticate(authorization: "Bearer \(keptSecret)") == .valid(kept))
        try authority.revoke(name: "kept")
        #expect(authority.authenticate(authorization: "Bearer \(keptSecret)") == .unknown)
        #expect(throws: ApusError.self) { try authority.create(name: "short", scopes: [.read]) }
        #expect(throws: ApusError.self) { try authority.create(name: "none", scopes: []) }
    }

    @Test func secretRoutesNeedTheSecretsScopeToChange() {
        let policy = APIPolicy()
        for route in ["/v1/secrets/{name}/keys/{key}"] {
            let rule = policy.rule(method: .put, route: route)
            #expect(rule.access.allows([.secrets]) && rule.access.allows([.admin]))
            #expect(!rule.access.allows([.deploy, .read, .invoke, .tasks]))
        }
        for route in ["/v1/secrets/{name}", "/v1/secrets/{name}/keys/{key}"] {
            #expect(!policy.rule(method: .delete, route: route).access.allows([.deploy, .read]))
            #expect(policy.rule(method: .delete, route: route).access.allows([.secrets]))
        }
        #expect(policy.rule(method: .get, route: "/v1/secrets").access.allows([.read]))
        #expect(policy.rule(method: .get, route: "/v1/secrets").access.allows([.secrets]))
        #expect(!policy.rule(method: .get, route: "/v1/secrets").access.allows([.deploy]))
        // No route reads a value back: anything else under /v1/secrets falls to admin-only (and is not served).
        #expect(policy.rule(method: .get, route: "/v1/secrets/{name}").access == .admin)
    }

    @Test func sidecarTokensHoldTheirServiceOnly() throws {
        let authority = try TokenAuthority(store: MemoryStore())
        let secret = authority.sidecarSecret(service: "svc.a")
        #expect(authority.sidecarSecret(service: "svc.a") == secret)
        #expect(authority.sidecarSecret(service: "svc.b") != secret)
        #expect(authority.authenticate(authorization: "Bearer \(secret)").token?.scopes == [.registry(service: "svc.a")])
        #expect(try authority.list().isEmpty)  // never stored
    }

    @Test func progressCapabilitiesAreBoundToTheirTask() throws {
        let authority = try TokenAuthority(store: MemoryStore())
        let capability = authority.progressCapability(taskID: "t-1")
        #expect(authority.isProgressCapability(capability, for: "t-1"))
        #expect(!authority.isProgressCapability(capability, for: "t-2"))
        #expect(!authority.isProgressCapability(capability + "x", for: "t-1"))
        #expect(try !TokenAuthority(store: MemoryStore()).isProgressCapability(capability, for: "t-1"))  // a new run, a new key
    }

    @Test func adminTokenFileIsMadeOnceAndPrivate() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("apus-auth-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let store = MemoryStore()
        let authority = try TokenAuthority(store: store)
        _ = try authority.ensureAdminTokenFile(in: dir)
        let file = dir.appendingPathComponent("admin.token")
        let secret = try String(contentsOf: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let mode = (try FileManager.default.attributesOfItem(atPath: file.path)[.posixPermissions] as? NSNumber)?.intValue
        #expect(mode == 0o600)
        #expect(authority.authenticate(authorization: "Bearer \(secret)").token?.scopes == [.admin])
        _ = try authority.ensureAdminTokenFile(in: dir)
        #expect(try String(contentsOf: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) == secret)
        #expect(try store.tokens().count == 1)
    }

    @Test func hostOriginAndMediaTypeChecks() throws {
        let policy = APIPolicy(allowedHosts: ["apus.internal"])
        for ok in ["127.0.0.1:7070", "localhost:7070", "[::1]:7070", "LOCALHOST", "api.localhost:1", "apus.internal:7070", "10.1.2.3"] {
            #expect(throws: Never.self) { try policy.checkHost(ok) }
        }
        for bad in ["evil.example:7070", "apus.internal.evil.example", "", "localhost.evil.example"] {
            #expect(throws: ApusError.self) { try policy.checkHost(bad) }
        }
        try policy.checkOrigin(nil, host: "127.0.0.1:7070")
        try policy.checkOrigin("http://127.0.0.1:7070", host: "127.0.0.1:7070")
        for bad in ["http://evil.example", "null", "http://127.0.0.1:8080", "file://"] {
            #expect(throws: ApusError.self) { try policy.checkOrigin(bad, host: "127.0.0.1:7070") }
        }
        try policy.checkContentType(nil, body: .json)
        try policy.checkContentType("application/json; charset=utf-8", body: .json)
        try policy.checkContentType("application/merge-patch+json", body: .json)
        try policy.checkContentType("application/gzip", body: .upload)
        try policy.checkContentType("text/plain", body: .opaque)
        for (type, body) in [("text/plain", APIPolicy.BodyKind.json), ("application/x-www-form-urlencoded", .json),
                             ("multipart/form-data; boundary=x", .upload), ("text/plain;charset=UTF-8", .upload)] {
            do {
                try policy.checkContentType(type, body: body)
                Issue.record("\(type) accepted")
            } catch {
                #expect(error.code == .unsupportedMediaType)
            }
        }
    }

    /// The gate on a router with stand-in handlers at real route paths (the test client always names `localhost`;
    /// foreign hosts are refused in `hostOriginAndMediaTypeChecks` and against a real apusd).
    @Test func gateAnswers401403415() async throws {
        let authority = try TokenAuthority(store: MemoryStore())
        let (_, admin) = try authority.create(name: "root", scopes: [.admin])
        let (_, reader) = try authority.create(name: "reader", scopes: [.read])
        let (_, deployer) = try authority.create(name: "deployer", scopes: [.deploy])
        let router = Router(context: ControlRequestContext.self)
        router.add(middleware: ControlGate(authority: authority, policy: APIPolicy(), audit: Logger(label: "test")))
        router.get("/healthz") { _, _ in "ok" }
        router.get("/v1/functions") { _, _ in "list" }
        router.post("/v1/functions") { _, _ in "deployed" }
        router.put("/v1/functions/:name/release") { _, _ in "released" }
        router.get("/v1/unlisted") { _, _ in "?" }
        let app = Application(router: router)
        try await app.test(.router) { client in
            func bearer(_ secret: String, _ more: HTTPFields = [:]) -> HTTPFields {
                var fields = more
                fields[.authorization] = "Bearer \(secret)"
                return fields
            }
            try await client.execute(uri: "/healthz", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v1/functions", method: .get) { response in
                #expect(response.status == .unauthorized)
                #expect(response.headers[HTTPField.Name("WWW-Authenticate")!]?.hasPrefix("Bearer") == true)
                #expect(String(buffer: response.body).contains("\"code\":\"unauthenticated\""))
            }
            try await client.execute(uri: "/v1/functions", method: .get, headers: bearer("apus_wrong")) {
                #expect($0.status == .unauthorized)
                #expect(String(buffer: $0.body).contains("not known"))
            }
            try await client.execute(uri: "/v1/functions", method: .get, headers: bearer(reader)) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v1/functions", method: .post, headers: bearer(reader)) { response in
                #expect(response.status == .forbidden)
                #expect(String(buffer: response.body).contains("needs scope deploy"))
            }
            try await client.execute(uri: "/v1/functions", method: .post, headers: bearer(deployer)) {
                #expect($0.status == .ok)
            }
            try await client.execute(uri: "/v1/functions", method: .post,
                                     headers: bearer(deployer, [.contentType: "text/plain"])) {
                #expect($0.status == .unsupportedMediaType)
            }
            try await client.execute(uri: "/v1/functions/f/release", method: .put,
                                     headers: bearer(admin, [.contentType: "text/plain"])) {
                #expect($0.status == .unsupportedMediaType)
            }
            try await client.execute(uri: "/v1/functions", method: .post,
                                     headers: bearer(admin, [HTTPField.Name("Origin")!: "http://evil.example"])) {
                #expect($0.status == .forbidden)
            }
            // A route missing from the policy needs admin (fail closed).
            try await client.execute(uri: "/v1/unlisted", method: .get, headers: bearer(reader)) { #expect($0.status == .forbidden) }
            try await client.execute(uri: "/v1/unlisted", method: .get, headers: bearer(admin)) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v1/nothing-here", method: .get) { #expect($0.status == .notFound) }
        }
    }
}
