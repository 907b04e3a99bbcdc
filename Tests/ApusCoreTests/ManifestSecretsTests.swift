import ApusCore
import Foundation
import Testing

@Suite("manifest secrets: references to stored secrets")
struct ManifestSecretsTests {
    func parse(_ lines: String) throws(ApusError) -> FunctionManifest {
        try FunctionManifest.parse(yaml: "name: f\nruntime: python3\nhandler: main.handler\n\(lines)\n")
    }

    func failure(_ lines: String) -> String {
        do {
            _ = try parse(lines)
            return "accepted"
        } catch {
            return error.message
        }
    }

    @Test func referencesAreParsedBothWays() throws {
        #expect(try parse("").secrets.isEmpty)
        #expect(try parse("secrets: {}").secrets.isEmpty)
        let manifest = try parse("""
            env: {PLAIN: x}
            secrets:
              DB_PASSWORD: {secret: db, key: password}
              API_KEY:
                secret: payments.stripe
                key: API-Key_2
            """)
        #expect(manifest.secrets == [
            "DB_PASSWORD": .init(secret: "db", key: "password"),
            "API_KEY": .init(secret: "payments.stripe", key: "API-Key_2"),
        ])
        #expect(manifest.env == ["PLAIN": "x"])
    }

    @Test func refusesWithTheKeyPath() {
        #expect(failure("secrets: {APUS_X: {secret: db, key: k}}") == "apus.yaml: secrets.APUS_X: APUS_ variables are set by the platform")
        #expect(failure("secrets: {1BAD: {secret: db, key: k}}") == "apus.yaml: secrets.1BAD: is not a valid environment variable name")
        #expect(failure("env: {X: plain}\nsecrets: {X: {secret: db, key: k}}").hasPrefix("apus.yaml: secrets.X: is also in env:"))
        #expect(failure("secrets: {X: db}").hasPrefix("apus.yaml: secrets.X: must be a mapping"))
        #expect(failure("secrets: {X: {secret: db}}") == "apus.yaml: secrets.X.key: is required")
        #expect(failure("secrets: {X: {key: k}}") == "apus.yaml: secrets.X.secret: is required")
        #expect(failure("secrets: {X: {secret: db, key: k, value: leaked}}").hasPrefix("apus.yaml: secrets.X.value: unknown key"))
        #expect(failure("secrets: {X: {secret: DB, key: k}}").hasPrefix("apus.yaml: secrets.X.secret: must be 1-253 characters"))
        #expect(failure("secrets: {X: {secret: db, key: \"a/b\"}}").hasPrefix("apus.yaml: secrets.X.key: must be 1-253 characters"))
        #expect(failure("secrets: [a, b]") == "apus.yaml: secrets: must be a mapping")
    }

    @Test func storedVersionsKeepTheirReferencesAndOlderOnesHaveNone() throws {
        let manifest = try parse("secrets: {DB_PASSWORD: {secret: db, key: password}}")
        let data = try JSONEncoder().encode(manifest)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: data) == manifest)
        // A version stored before `secrets:` existed (no key at all) decodes with none, and one without secrets is
        // stored as before.
        let plain = try parse("")
        let plainJSON = try JSONSerialization.jsonObject(with: JSONEncoder().encode(plain)) as? [String: Any]
        #expect(plainJSON?["secrets"] == nil)
        #expect(try JSONDecoder().decode(FunctionManifest.self, from: JSONEncoder().encode(plain)).secrets.isEmpty)
    }

    @Test func namesAndKeys() {
        #expect(FunctionManifest.SecretReference.isSecretName("db"))
        #expect(FunctionManifest.SecretReference.isSecretName("payments.stripe-v2_x"))
        #expect(!FunctionManifest.SecretReference.isSecretName(""))
        #expect(!FunctionManifest.SecretReference.isSecretName("-db"))
        #expect(!FunctionManifest.SecretReference.isSecretName("Db"))
        #expect(!FunctionManifest.SecretReference.isSecretName(String(repeating: "a", count: 254)))
        #expect(FunctionManifest.SecretReference.isKeyName("API_Key.v2-x"))
        #expect(!FunctionManifest.SecretReference.isKeyName("a b"))
        #expect(!FunctionManifest.SecretReference.isKeyName(""))
    }
}
