import ApusCore
import ApusStore
import Foundation
import Testing

/// Control-API tokens in every Store implementation: kept (hash only), listed, unique by name, revoked.
@Suite("Store: API tokens")
struct TokenStoreTests {
    func token(_ name: String, _ scopes: [APIScope], expires: Date? = nil) -> APIToken {
        APIToken(id: "tok-\(name)", name: name, hash: String(repeating: name.first.map(String.init) ?? "0", count: 64),
                 scopes: scopes, createdAt: Date(timeIntervalSince1970: 1_800_000_000), expiresAt: expires)
    }

    @Test(arguments: StoreTests.Kind.allCases)
    func tokensRoundTrip(kind: StoreTests.Kind) throws {
        let (store, dir) = try StoreTests.makeStore(kind)
        let ci = token("ci", [.deploy, .read], expires: Date(timeIntervalSince1970: 1_900_000_000))
        let sidecar = token("b-sidecar", [.registry(service: "payments.refund")])
        try store.createToken(ci)
        try store.createToken(sidecar)
        #expect(try store.tokens() == [sidecar, ci])
        #expect(throws: ApusError.self) { try store.createToken(token("ci", [.read])) }
        if let dir {
            let reopened = try SQLiteStore(path: dir.appendingPathComponent("apus.db").path)
            #expect(try reopened.tokens() == [sidecar, ci])
        }
        #expect(try store.deleteToken(named: "ci") == ci)
        #expect(try store.tokens() == [sidecar])
        do {
            _ = try store.deleteToken(named: "ci")
            Issue.record("a revoked token was revoked again")
        } catch {
            #expect(error.code == .notFound)
        }
    }
}
