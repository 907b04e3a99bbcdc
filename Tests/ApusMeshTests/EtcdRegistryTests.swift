#if canImport(Glibc)
import Glibc
#endif
import ApusMesh
import Foundation
import Logging
import Testing

/// A real etcd (Debian's etcd-server) on loopback in a temp dir; the suite is skipped where `etcd` is not installed.
final class EtcdProcess: @unchecked Sendable {
    static let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"].first { FileManager.default.isExecutableFile(atPath: $0) }

    let directory: URL
    let clientPort: Int
    let peerPort: Int
    private var process: Process?

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("apus-etcd-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        clientPort = Self.freePort()
        peerPort = Self.freePort()
    }

    var url: String { "etcd://127.0.0.1:\(clientPort)" }

    /// A loopback port nothing listens on (bound to 0, then released).
    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                _ = bind(fd, pointer, length)
                return getsockname(fd, pointer, &length)
            }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    func start() async throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary!)
        let client = "http://127.0.0.1:\(clientPort)"
        let peer = "http://127.0.0.1:\(peerPort)"
        process.arguments = ["--name", "t", "--data-dir", directory.appendingPathComponent("data").path,
                             "--listen-client-urls", client, "--advertise-client-urls", client,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", "t=\(peer)", "--log-level", "error"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        let registry = EtcdRegistry(baseURL: client, logger: Logger(label: "test"))
        for _ in 0..<200 {
            if (try? await registry.resolve("probe.service")) != nil { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw RegistryError.unavailable("etcd did not start")
    }

    func stop(wipe: Bool) {
        process?.terminate()
        process?.waitUntilExit()
        process = nil
        if wipe { try? FileManager.default.removeItem(at: directory.appendingPathComponent("data")) }
    }

    deinit {
        stop(wipe: true)
        try? FileManager.default.removeItem(at: directory)
    }
}

@Suite("etcd registry", .enabled(if: EtcdProcess.binary != nil, "etcd is not installed"))
struct EtcdRegistryTests {
    let logger = Logger(label: "test")

    func endpoint(_ id: String) -> ServiceEndpoint {
        ServiceEndpoint(id: id, address: "10.0.0.1", port: 8080, protocol: "http", zone: "z", metadata: ["m": "1"])
    }

    @Test func leasesWatchesAndAKeeperThroughAnEtcdRestart() async throws {
        let etcd = try EtcdProcess()
        try await etcd.start()
        let registry = try makeServiceRegistry(url: etcd.url, logger: logger)

        var changes = registry.watch("orders.list").makeAsyncIterator()
        #expect(try await changes.next() == [])
        let a = try await registry.register(service: "orders.list", endpoint: endpoint("a"), ttlSeconds: 5)
        #expect(try await changes.next() == [endpoint("a")])
        try await registry.heartbeat(a)
        try await registry.setHealth(a, healthy: false)
        #expect(try await changes.next()?.map(\.healthy) == [false])
        #expect(try await registry.services().map(\.name) == ["orders.list"])
        try await registry.deregister(a)
        #expect(try await changes.next() == [])
        await #expect(throws: RegistryError.leaseNotFound(a.leaseID)) { try await registry.heartbeat(a) }

        // A keeper holds a registration through an etcd restart that loses every key and lease; the watch resumes.
        let keeper = RegistrationKeeper(registry: registry, service: "orders.list", endpoint: endpoint("k"), ttlSeconds: 3, logger: logger)
        try await keeper.startAndWait()
        #expect(try await changes.next()?.map(\.id) == ["k"])
        etcd.stop(wipe: true)
        try await etcd.start()
        var restored = false
        for _ in 0..<100 where !restored {
            try await Task.sleep(for: .milliseconds(100))
            restored = (try? await registry.resolve("orders.list").map(\.id)) == ["k"]
        }
        #expect(restored)
        #expect(await keeper.registrations == 2)
        await keeper.stop()
        #expect(try await registry.resolve("orders.list").isEmpty)
        // The watch saw the registration come back and go (possibly the empty list of the wiped store first).
        var seen: [[String]] = []
        while seen.last != [] || !seen.contains(["k"]) {
            guard let next = try await changes.next() else { break }
            seen.append(next.map(\.id))
        }
        #expect(seen.contains(["k"]) && seen.last == [])
    }
}
