import ApusCore
import ApusTasks
import Foundation
import Testing

/// The task store on a real SQLite file in a temp directory.
@Suite("task store")
struct TaskStoreTests {
    func withStore(_ body: (TaskStore, String) async throws -> Void) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("apus-task-store-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("tasks.sqlite").path
        let store = try TaskStore(path: path)
        defer { store.close() }
        try await body(store, path)
    }

    func record(_ id: String, seq: Int64, key: String? = nil, function: String = "f", at now: Double = 1000) -> TaskRecord {
        TaskRecord(id: id, submission: TaskSubmission(function: function, payload: Array("p-\(id)".utf8), idempotencyKey: key), seq: seq, now: now)
    }

    @Test("concurrent inserts are all committed (group commit) and read back with their payloads")
    func concurrentInserts() async throws {
        try await withStore { store, path in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0..<500 {
                    group.addTask {
                        let r = record("t\(i)", seq: Int64(i))
                        let (_, created) = try await store.insert(r, payload: Array("p-t\(i)".utf8))
                        #expect(created)
                    }
                }
                try await group.waitForAll()
            }
            #expect(try store.counts() == ["queued": 500])
            #expect(try store.payload(of: "t7") == Array("p-t7".utf8))
            #expect(try store.active().map(\.seq) == (0..<500).map(Int64.init), "active tasks come back in submission order")
            #expect(try store.maxSeq() == 499)
            // A second store on the same file (as after a restart) sees every row.
            let reopened = try TaskStore(path: path)
            defer { reopened.close() }
            #expect(try reopened.counts() == ["queued": 500])
        }
    }

    @Test("an idempotency key returns the first task, per function")
    func idempotency() async throws {
        try await withStore { store, _ in
            let first = try await store.insert(record("a", seq: 1, key: "k"), payload: [1])
            let second = try await store.insert(record("b", seq: 2, key: "k"), payload: [2])
            let otherFunction = try await store.insert(record("c", seq: 3, key: "k", function: "g"), payload: [3])
            #expect(first.created && !second.created && otherFunction.created)
            #expect(second.record.id == "a")
            #expect(try store.record("b") == nil)
        }
    }

    @Test("updates: running, requeued, finished with a result, progress, filters and purge")
    func lifecycle() async throws {
        try await withStore { store, _ in
            _ = try await store.insert(record("a", seq: 1, at: 1000), payload: [])
            _ = try await store.insert(record("b", seq: 2, at: 2000), payload: [])
            try await store.apply([.running(id: "a", attempt: 1, startedAt: 1001), .placed(id: "a", instanceID: "i-1", version: 3),
                                   .progress(id: "a", progress: 0.5, message: "half", at: 1002)])
            var a = try #require(try store.record("a"))
            #expect(a.state == .running && a.attempt == 1 && a.instanceID == "i-1" && a.version == 3 && a.progress == 0.5)
            try await store.apply([.requeued(id: "a", attempt: 1, throttles: 0, notBefore: 1010, error: "boom", at: 1003)])
            a = try #require(try store.record("a"))
            #expect(a.state == .queued && a.notBefore == 1010 && a.error == "boom")
            try await store.apply([.finished(id: "a", state: .succeeded, at: 1020, error: nil, result: Array("ok".utf8),
                                             resultContentType: "text/plain", statusCode: 200, callbackPending: true)])
            a = try #require(try store.record("a"))
            #expect(a.state == .succeeded && a.result == Array("ok".utf8) && a.statusCode == 200 && a.callbackState == "pending")
            #expect(try store.pendingCallbacks().map(\.id) == ["a"])
            try await store.apply([.finished(id: "b", state: .failed, at: 2500, error: "x", result: nil, resultContentType: nil,
                                             statusCode: nil, callbackPending: false)])
            #expect(try store.list(.init(states: [.failed, .timedOut, .expired])).map(\.id) == ["b"])
            #expect(try store.list(.init(since: 1500)).map(\.id) == ["b"])
            #expect(try store.list(.init(until: 1500)).map(\.id) == ["a"])
            #expect(try store.list(.init(limit: 1)).map(\.id) == ["b"], "newest first")
            #expect(try await store.purge(finishedBefore: 2000) == 1)
            #expect(try store.record("a") == nil && store.record("b") != nil)
        }
    }
}
