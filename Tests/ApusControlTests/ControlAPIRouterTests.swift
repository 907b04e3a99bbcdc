@testable import ApusControl
import ApusCore
import ApusRuntime
import ApusScheduler
import ApusStore
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Testing

/// The control API's routes through Hummingbird's router test driver: a real `ControlPlane` over an in-memory
/// store and a code store in a temporary folder, a scheduler whose launcher is never asked for an instance (every
/// function here scales from zero), and no authentication (`ControlAuthTests` covers the gate).
@Suite("control API routes")
struct ControlAPIRouterTests {
    struct NoInstances: InstanceLauncher {
        func launch(_ spec: InstanceSpec, onExit: @escaping @Sendable (InstanceExit) -> Void) async throws(ApusError) -> any InstanceHandle {
            throw ApusError(.unavailable, "no instances in this test")
        }
    }

    final class Fixture {
        let directory: URL
        let api: ControlAPI

        init() throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("apus-api-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            let catalog = FunctionCatalog()
            let scheduler = Scheduler(
                configuration: .init(), catalog: catalog, launcher: NoInstances(),
                codeDirectory: { _ in URL(fileURLWithPath: "/nonexistent") }, logger: Logger(label: "test"))
            let control = ControlPlane(
                store: MemoryStore(), code: try CodeStore(root: directory.appendingPathComponent("code")), scheduler: scheduler,
                logs: try FunctionLogs(directory: directory.appendingPathComponent("logs")), logger: Logger(label: "test"))
            api = ControlAPI(
                control: control,
                info: { .init(version: "test", gateway: .init(http: "http://127.0.0.1:1"), domain: "apus.localhost", sandbox: "none") },
                stopping: ShutdownFlag(), logger: Logger(label: "test"))
        }

        deinit {
            try? FileManager.default.removeItem(at: directory)
        }

        /// A gzip'd tar of `files` (name → contents), as `apus deploy` uploads it.
        func archive(_ files: [String: String]) throws -> ByteBuffer {
            let source = directory.appendingPathComponent("src-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: source, withIntermediateDirectories: true)
            for (name, text) in files { try text.write(to: source.appendingPathComponent(name), atomically: true, encoding: .utf8) }
            let output = directory.appendingPathComponent("\(UUID().uuidString).tar.gz")
            let tar = Process()
            tar.executableURL = URL(fileURLWithPath: "/bin/tar")
            tar.arguments = ["-czf", output.path, "-C", source.path] + files.keys.sorted()
            try tar.run()
            tar.waitUntilExit()
            #expect(tar.terminationStatus == 0)
            return ByteBuffer(bytes: try Data(contentsOf: output))
        }
    }

    static let handler = "def handler(event, context):\n    return {\"ok\": True}\n"

    static func manifest(_ name: String, extra: String = "") -> String {
        "name: \(name)\nruntime: python3\nhandler: main.handler\nscale:\n  min: 0\n  max: 1\n\(extra)"
    }

    static func json(_ buffer: ByteBuffer) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(buffer: buffer))) as? [String: Any] ?? [:]
    }

    static func errorMessage(_ buffer: ByteBuffer) -> String {
        ((json(buffer)["error"] as? [String: Any])?["message"] as? String) ?? String(buffer: buffer)
    }

    @Test func deployReadReleaseAndDeleteAFunction() async throws {
        let fixture = try Fixture()
        let app = Application(router: fixture.api.makeRouter())
        let archive = try fixture.archive(["apus.yaml": Self.manifest("hello", extra: "env:\n  GREETING: hi\n"), "main.py": Self.handler])
        let second = try fixture.archive(["apus.yaml": Self.manifest("hello"), "main.py": Self.handler])
        let json: HTTPFields = [.contentType: "application/json"]
        try await app.test(.router) { client in
            try await client.execute(uri: "/healthz", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v1/info", method: .get) { response in
                #expect(Self.json(response.body)["domain"] as? String == "apus.localhost")
            }
            try await client.execute(uri: "/v1/functions", method: .post, headers: [.contentType: "application/gzip"], body: archive) { response in
                #expect(response.status == .created, "\(String(buffer: response.body))")
            }
            try await client.execute(uri: "/v1/functions?release=false", method: .post, headers: [.contentType: "application/gzip"], body: second) {
                #expect($0.status == .created)
            }
            try await client.execute(uri: "/v1/functions", method: .get) { response in
                let names = (Self.json(response.body)["functions"] as? [[String: Any]])?.compactMap { $0["name"] as? String }
                #expect(names == ["hello"])
            }
            try await client.execute(uri: "/v1/functions/hello", method: .get) { response in
                let detail = Self.json(response.body)
                #expect(detail["latestVersion"] as? Int == 2)
                let weights = ((detail["release"] as? [String: Any])?["weights"] as? [[String: Any]])?.map { $0["version"] as? Int }
                #expect(weights == [1], "deployed with ?release=false: version 1 still takes the traffic")
            }
            try await client.execute(uri: "/v1/functions/hello/versions/2", method: .get) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v1/functions/hello/versions/3", method: .get) { response in
                #expect(response.status == .notFound)
                #expect(Self.errorMessage(response.body) == "function hello has no version 3")
            }
            try await client.execute(uri: "/v1/functions/hello/versions/two", method: .get) { response in
                #expect(response.status == .badRequest)
                #expect(Self.errorMessage(response.body) == "version must be a number")
            }
            // Releases: a split over both versions; a version that does not exist and a malformed body are refused.
            try await client.execute(uri: "/v1/functions/hello/release", method: .put, headers: json,
                                     body: ByteBuffer(string: #"{"weights":[{"version":1,"weight":90},{"version":2,"weight":10}]}"#)) {
                #expect($0.status == .ok, "\(String(buffer: $0.body))")
            }
            try await client.execute(uri: "/v1/functions/hello/release", method: .put, headers: json,
                                     body: ByteBuffer(string: #"{"weights":[{"version":7,"weight":100}]}"#)) { response in
                #expect((400..<500).contains(response.status.code))
                #expect(Self.errorMessage(response.body).contains("7"), "\(Self.errorMessage(response.body))")
            }
            try await client.execute(uri: "/v1/functions/hello/release", method: .put, headers: json, body: ByteBuffer(string: "[1]")) { response in
                #expect(response.status == .badRequest)
                #expect(Self.errorMessage(response.body).hasPrefix("release body must be"))
            }
            try await client.execute(uri: "/v1/functions/hello", method: .delete) { #expect($0.status == .noContent) }
            try await client.execute(uri: "/v1/functions/hello", method: .get) { response in
                #expect(response.status == .notFound)
                #expect((Self.json(response.body)["error"] as? [String: Any])?["code"] as? String == "not_found")
            }
        }
    }

    @Test func badArchivesAndManifestsSayWhatIsWrong() async throws {
        let fixture = try Fixture()
        let app = Application(router: fixture.api.makeRouter())
        let badRuntime = try fixture.archive(["apus.yaml": "name: f\nruntime: cobol\nhandler: main.handler\n", "main.py": Self.handler])
        let badName = try fixture.archive(["apus.yaml": Self.manifest("Not_A_Name"), "main.py": Self.handler])
        let noManifest = try fixture.archive(["main.py": Self.handler])
        try await app.test(.router) { client in
            for (archive, expected) in [(badRuntime, "runtime"), (badName, "name"), (noManifest, "apus.yaml")] {
                try await client.execute(uri: "/v1/functions", method: .post, headers: [.contentType: "application/gzip"], body: archive) { response in
                    #expect(response.status == .badRequest, "\(expected): \(String(buffer: response.body))")
                    #expect(Self.errorMessage(response.body).contains(expected), "\(Self.errorMessage(response.body))")
                }
            }
            try await client.execute(uri: "/v1/functions", method: .post, headers: [.contentType: "application/gzip"],
                                     body: ByteBuffer(string: "not a gzip stream")) { response in
                #expect(response.status == .badRequest, "\(String(buffer: response.body))")
            }
            try await client.execute(uri: "/v1/functions", method: .get) { response in
                #expect((Self.json(response.body)["functions"] as? [Any])?.isEmpty == true, "nothing refused was kept")
            }
        }
    }
}
