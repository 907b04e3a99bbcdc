import ApusCore
import Foundation
import Testing

@Suite("apus.yaml async: settings")
struct AsyncManifestTests {
    func parse(_ async: String) throws(ApusError) -> FunctionManifest {
        try FunctionManifest.parse(yaml: "name: job\nruntime: python3\n\(async)\n")
    }

    func failure(_ async: String) -> String {
        do {
            _ = try parse(async)
            return "(accepted)"
        } catch {
            return error.message
        }
    }

    @Test func absentTrueAndFalse() throws {
        #expect(try parse("").async == nil)
        #expect(try parse("").asyncSettings == .defaults)
        #expect(try parse("async: true").async == .defaults)
        #expect(try parse("async: false").async == nil)
    }

    @Test func everyKey() throws {
        let m = try parse("""
            async:
              concurrency: 3
              timeout: 2h
              retries: 5
              backoff: 500ms
              max_backoff: 1m
              max_age: 48h
              rate: 600/m
              callback: https://example.com/hook
              heartbeat: 30s
            """)
        let a = try #require(m.async)
        #expect(a.concurrency == 3)
        #expect(a.timeout == .seconds(7200))
        #expect(a.retries == 5)
        #expect(a.backoff == .milliseconds(500))
        #expect(a.maxBackoff == .seconds(60))
        #expect(a.maxAge == .seconds(48 * 3600))
        #expect(a.rate == 10)
        #expect(a.callback == "https://example.com/hook")
        #expect(a.heartbeat == .seconds(30))
        // Stored versions read back the same (JSON in the store).
        let decoded = try JSONDecoder().decode(FunctionManifest.self, from: JSONEncoder().encode(m))
        #expect(decoded == m)
    }

    @Test func badValuesNameTheKeyAndTheReason() {
        #expect(failure("async: {bogus: 1}").contains("async.bogus: unknown key"))
        #expect(failure("async: maybe").contains("async: must be true, false or a mapping"))
        #expect(failure("async: {concurrency: 0}").contains("async.concurrency: must be between 1 and 10000"))
        #expect(failure("async: {timeout: 25h}").contains("async.timeout: must be between 10ms and 24h"))
        #expect(failure("async: {timeout: soon}").contains("async.timeout: must be a duration"))
        #expect(failure("async: {retries: -1}").contains("async.retries: must be between 0 and 100"))
        #expect(failure("async: {backoff: 10s, max_backoff: 1s}").contains("async.max_backoff: must be ≥ async.backoff"))
        #expect(failure("async: {rate: 0}").contains("async.rate: must be task starts per second"))
        #expect(failure("async: {rate: 5/day}").contains("async.rate"))
        #expect(failure("async: {callback: 'ftp://x'}").contains("async.callback: must be an http:// or https:// URL"))
        #expect(failure("async: {heartbeat: 1ms}").contains("async.heartbeat: must be between 100ms and 24h"))
    }

    @Test func rates() {
        #expect(FunctionManifest.parseRate("5") == 5)
        #expect(FunctionManifest.parseRate("0.5") == 0.5)
        #expect(FunctionManifest.parseRate("10/s") == 10)
        #expect(FunctionManifest.parseRate("120/m") == 2)
        #expect(FunctionManifest.parseRate("36/h") == 0.01)
        #expect(FunctionManifest.parseRate("-1") == nil)
        #expect(FunctionManifest.parseRate("1/2/3") == nil)
    }

    @Test func idempotencyKeysAndPriorities() throws {
        try TaskSubmission.validateIdempotencyKey("order-42:v1.retry_2")
        try TaskSubmission.validateIdempotencyKey(String(repeating: "k", count: 128))
        for bad in ["", String(repeating: "k", count: 129), "has space", "slash/", "ünï"] {
            #expect(throws: ApusError.self) { try TaskSubmission.validateIdempotencyKey(bad) }
        }
        #expect(try TaskSubmission.parsePriority(" -5 ") == -5)
        #expect(throws: ApusError.self) { try TaskSubmission.parsePriority("1001") }
        #expect(throws: ApusError.self) { try TaskSubmission.parsePriority("high") }
    }
}
