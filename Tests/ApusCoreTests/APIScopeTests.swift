import ApusCore
import Foundation
import Testing

@Suite("API scopes and access")
struct APIScopeTests {
    @Test func scopesParseAndPrint() throws {
        for text in ["admin", "deploy", "read", "invoke", "tasks", "secrets", "registry:payments.refund"] {
            #expect(try APIScope.parse(text).description == text)
        }
        #expect(APIScope("registry:payments.refund") == .registry(service: "payments.refund"))
        for bad in ["", "Admin", "write", "registry:", "registry:Pay ments", "registry"] {
            #expect(APIScope(bad) == nil, "\(bad) parsed")
        }
        let encoded = try JSONEncoder().encode([APIScope.read, .registry(service: "a.b")])
        #expect(String(decoding: encoded, as: UTF8.self) == #"["read","registry:a.b"]"#)
        #expect(try JSONDecoder().decode([APIScope].self, from: encoded) == [.read, .registry(service: "a.b")])
    }

    @Test func adminAllowsEverything() {
        for access in [APIAccess.admin, .anyOf([.deploy]), .registryService, .registryRead, .registryLease, .open] {
            #expect(access.allows([.admin], service: "x"))
        }
    }

    @Test func scopesAllowOnlyTheirRoutes() {
        #expect(APIAccess.anyOf([.deploy]).allows([.deploy, .read]))
        #expect(!APIAccess.anyOf([.deploy]).allows([.read]))
        #expect(!APIAccess.admin.allows([.deploy, .read, .tasks, .invoke]))
        #expect(APIAccess.anyOf([.tasks, .invoke]).allows([.invoke]))
        #expect(APIAccess.open.allows([]))
        // registry:<service> reaches that service only.
        let a: [APIScope] = [.registry(service: "svc.a")]
        #expect(APIAccess.registryService.allows(a, service: "svc.a"))
        #expect(!APIAccess.registryService.allows(a, service: "svc.b"))
        #expect(!APIAccess.registryService.allows(a, service: nil))
        #expect(!APIAccess.registryService.allows([.read, .deploy], service: "svc.a"))
        #expect(APIAccess.registryRead.allows(a) && APIAccess.registryRead.allows([.read]))
        #expect(!APIAccess.registryRead.allows([.deploy]))
        #expect(APIAccess.registryLease.allows(a) && !APIAccess.registryLease.allows([.read]))
        #expect(!APIAccess.anyOf([.read]).allows(a))
    }

    @Test func refusalsNameTheScope() {
        #expect(APIAccess.anyOf([.deploy]).needed() == "deploy")
        #expect(APIAccess.anyOf([.tasks, .invoke]).needed() == "one of tasks, invoke")
        #expect(APIAccess.registryService.needed(service: "svc.b") == "registry:svc.b")
    }

    @Test func tokenNamesAndExpiry() throws {
        try APIToken.validateName("ci-deploy_2.prod")
        for bad in ["", "-x", "Upper", "has space", String(repeating: "a", count: 65)] {
            #expect(throws: ApusError.self) { try APIToken.validateName(bad) }
        }
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        var token = APIToken(id: "tok-1", name: "t", hash: "h", scopes: [.read], createdAt: now)
        #expect(!token.isExpired(at: now.addingTimeInterval(1e9)))
        token.expiresAt = now.addingTimeInterval(60)
        #expect(!token.isExpired(at: now.addingTimeInterval(59)))
        #expect(token.isExpired(at: now.addingTimeInterval(60)))
    }
}
