import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// `ServiceRegistry` over etcd v3's JSON gateway (`etcd://host:port`; tested with etcd 3.4), for many machines.
///
/// Each endpoint is the key `/apus/services/<service>/<endpoint-id>` holding the endpoint as JSON, attached to a
/// lease of its own (`/v3/lease/grant` with the TTL): heartbeats are `/v3/lease/keepalive`, deregistration is
/// `/v3/lease/revoke` (which deletes the key), and etcd deletes the key itself when the lease runs out. Watches
/// read the prefix (`/v3/kv/range`) and then follow `/v3/watch` from the next revision, re-reading and resuming
/// after etcd restarts. Keys and values travel base64-encoded; 64-bit numbers travel as decimal strings.
public struct EtcdRegistry: SnapshottingServiceRegistry {
    /// `http://host:port` of an etcd client URL.
    public let baseURL: String
    public static let keyPrefix = "/apus/services/"
    let logger: Logger

    public init(baseURL: String, logger: Logger) {
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.logger = logger
    }

    // MARK: etcd JSON calls

    typealias JSON = [String: Any]

    /// One unary call; answers the decoded object, or throws `unavailable` (transport, 5xx) / `leaseNotFound`
    /// (etcd's gRPC NOT_FOUND, code 5, when `lease` is given).
    func call(_ path: String, _ body: JSON, lease: String? = nil, timeout: Duration = .seconds(5)) async throws -> JSON {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        let status: Int
        let data: Data
        do {
            let response = try await MeshHTTP.client.execute(request, timeout: MeshHTTP.timeAmount(timeout))
            status = Int(response.status.code)
            data = Data(buffer: try await response.body.collect(upTo: 64 << 20))
        } catch let error as CancellationError {
            throw error
        } catch {
            throw RegistryError.unavailable("etcd \(baseURL)\(path): \(error)")
        }
        let object = (try? JSONSerialization.jsonObject(with: data)) as? JSON
        guard (200..<300).contains(status), let object else {
            let message = object?["message"] as? String ?? String(decoding: data.prefix(200), as: UTF8.self)
            if let lease, (object?["code"] as? Int) == 5 || message.contains("lease not found") {
                throw RegistryError.leaseNotFound(lease)
            }
            throw RegistryError.unavailable("etcd \(path): HTTP \(status): \(message)")
        }
        return object
    }

    static func b64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

    static func unb64(_ value: Any?) -> String? {
        guard let text = value as? String, let data = Data(base64Encoded: text) else { return nil }
        return String(decoding: data, as: UTF8.self)
    }

    /// etcd's int64 fields: decimal strings (numbers accepted too); absent means 0.
    static func int64(_ value: Any?) -> Int64 {
        if let text = value as? String { return Int64(text) ?? 0 }
        if let number = value as? NSNumber { return number.int64Value }
        return 0
    }

    /// The key range of one service, or of every service (`service == nil`).
    static func range(_ service: String?) -> (key: String, end: String) {
        let prefix = keyPrefix + (service.map { $0 + "/" } ?? "")
        // The end of a prefix range is the prefix with its last byte incremented ('/' + 1 == '0').
        return (prefix, String(prefix.dropLast()) + "0")
    }

    static func key(service: String, endpointID: String) -> String { keyPrefix + service + "/" + endpointID }

    /// One stored endpoint, as read from a key-value.
    struct Stored {
        var service: String
        var endpoint: ServiceEndpoint
        var leaseID: String
        var modRevision: Int64
    }

    static func decode(_ kv: JSON) -> Stored? {
        guard let key = unb64(kv["key"]), key.hasPrefix(keyPrefix), let value = unb64(kv["value"]) else { return nil }
        let rest = key.dropFirst(keyPrefix.count)
        guard let slash = rest.firstIndex(of: "/") else { return nil }
        guard let endpoint = try? JSONDecoder().decode(ServiceEndpoint.self, from: Data(value.utf8)) else { return nil }
        return Stored(service: String(rest[..<slash]), endpoint: endpoint, leaseID: String(int64(kv["lease"])),
                      modRevision: int64(kv["mod_revision"]))
    }

    /// Reads a prefix: the stored endpoints and the store's revision at the time of the read.
    func read(_ service: String?) async throws -> (entries: [Stored], revision: Int64) {
        let (key, end) = Self.range(service)
        let reply = try await call("/v3/kv/range", ["key": Self.b64(key), "range_end": Self.b64(end)])
        let kvs = reply["kvs"] as? [JSON] ?? []
        let revision = Self.int64((reply["header"] as? JSON)?["revision"])
        return (kvs.compactMap(Self.decode).filter { service == nil || $0.service == service }, revision)
    }

    func readOne(service: String, endpointID: String) async throws -> Stored? {
        let reply = try await call("/v3/kv/range", ["key": Self.b64(Self.key(service: service, endpointID: endpointID))])
        return (reply["kvs"] as? [JSON] ?? []).first.flatMap(Self.decode)
    }

    func put(service: String, endpoint: ServiceEndpoint, leaseID: String, previous: Bool = false) async throws -> JSON {
        let value = try JSONEncoder().encode(endpoint)
        return try await call("/v3/kv/put", [
            "key": Self.b64(Self.key(service: service, endpointID: endpoint.id)),
            "value": value.base64EncodedString(),
            "lease": leaseID,
            "prev_kv": previous,
        ], lease: leaseID)
    }

    func revoke(_ leaseID: String) async throws {
        _ = try await call("/v3/lease/revoke", ["ID": leaseID], lease: leaseID)
    }

    // MARK: ServiceRegistry

    public func register(service: String, endpoint: ServiceEndpoint, ttlSeconds: Int) async throws -> RegistrationLease {
        try RegistryValidation.validate(service: service, endpoint: endpoint, ttlSeconds: ttlSeconds)
        let grant = try await call("/v3/lease/grant", ["TTL": ttlSeconds])
        let leaseID = String(Self.int64(grant["ID"]))
        guard leaseID != "0" else { throw RegistryError.unavailable("etcd granted no lease: \(grant)") }
        let reply: JSON
        do {
            reply = try await put(service: service, endpoint: endpoint, leaseID: leaseID, previous: true)
        } catch {
            try? await revoke(leaseID)
            throw error
        }
        // Registering an id again replaces it: the earlier registration's lease goes (and with it only that lease).
        if let previous = reply["prev_kv"] as? JSON {
            let old = String(Self.int64(previous["lease"]))
            if old != "0", old != leaseID { try? await revoke(old) }
        }
        return RegistrationLease(service: service, endpointID: endpoint.id, leaseID: leaseID, ttlSeconds: ttlSeconds)
    }

    public func heartbeat(_ lease: RegistrationLease) async throws {
        let reply = try await call("/v3/lease/keepalive", ["ID": lease.leaseID], lease: lease.leaseID)
        // A stream of one message: {"result": {"ID": …, "TTL": …}}; an unknown lease answers without a TTL.
        let result = reply["result"] as? JSON ?? reply
        guard Self.int64(result["TTL"]) > 0 else { throw RegistryError.leaseNotFound(lease.leaseID) }
    }

    public func setHealth(_ lease: RegistrationLease, healthy: Bool) async throws {
        guard var stored = try await readOne(service: lease.service, endpointID: lease.endpointID), stored.leaseID == lease.leaseID else {
            throw RegistryError.leaseNotFound(lease.leaseID)
        }
        guard stored.endpoint.healthy != healthy else { return }
        stored.endpoint.healthy = healthy
        _ = try await put(service: lease.service, endpoint: stored.endpoint, leaseID: lease.leaseID)
    }

    public func deregister(_ lease: RegistrationLease) async throws {
        try await revoke(lease.leaseID)
    }

    /// Removes an endpoint whoever registered it (the API's `DELETE` without a lease): revokes its lease.
    public func deregister(service: String, endpointID: String, leaseID: String?) async throws {
        guard let stored = try await readOne(service: service, endpointID: endpointID) else {
            throw RegistryError.leaseNotFound(leaseID ?? "of \(service)/\(endpointID)")
        }
        if let leaseID, leaseID != stored.leaseID { throw RegistryError.leaseNotFound(leaseID) }
        if stored.leaseID == "0" {
            _ = try await call("/v3/kv/deleterange", ["key": Self.b64(Self.key(service: service, endpointID: endpointID))])
        } else {
            try await revoke(stored.leaseID)
        }
    }

    /// The registration a lease holds (one read of the prefix and one lease lookup): what the API needs to renew
    /// or flag an entry by lease id alone.
    public func registration(holding leaseID: String) async throws -> RegistrationLease {
        guard let stored = try await read(nil).entries.first(where: { $0.leaseID == leaseID }) else {
            throw RegistryError.leaseNotFound(leaseID)
        }
        let granted = await leaseTimes([leaseID])[leaseID]?.granted ?? 0
        return RegistrationLease(service: stored.service, endpointID: stored.endpoint.id, leaseID: leaseID, ttlSeconds: Int(granted))
    }

    public func resolve(_ service: String) async throws -> [ServiceEndpoint] {
        try RegistryValidation.validateService(service)
        return try await read(service).entries.map(\.endpoint).sorted { $0.id < $1.id }
    }

    public func services() async throws -> [ServiceRecord] {
        try await snapshots().map(\.record)
    }

    /// Remaining and granted TTL of each lease (`/v3/lease/timetolive`); leases already gone are left out.
    func leaseTimes(_ leases: Set<String>) async -> [String: (left: Int64, granted: Int64)] {
        var times: [String: (Int64, Int64)] = [:]
        for lease in leases where lease != "0" {
            guard let reply = try? await call("/v3/lease/timetolive", ["ID": lease], lease: lease) else { continue }
            let left = Self.int64(reply["TTL"])
            if left >= 0 { times[lease] = (left, Self.int64(reply["grantedTTL"])) }
        }
        return times
    }

    static func snapshot(_ service: String, _ entries: [Stored], index: Int64, times: [String: (left: Int64, granted: Int64)]) -> ServiceSnapshot {
        let endpoints = entries.sorted { $0.endpoint.id < $1.endpoint.id }.map { stored in
            RegisteredEndpoint(endpoint: stored.endpoint, leaseID: stored.leaseID,
                               ttlSeconds: times[stored.leaseID].map { Int($0.granted) },
                               expiresInSeconds: times[stored.leaseID].map { Double($0.left) })
        }
        return ServiceSnapshot(name: service, index: UInt64(max(index, 0)), endpoints: endpoints)
    }

    public func snapshot(_ service: String) async throws -> ServiceSnapshot {
        try RegistryValidation.validateService(service)
        let entries = try await read(service).entries
        let times = await leaseTimes(Set(entries.map(\.leaseID)))
        return Self.snapshot(service, entries, index: entries.map(\.modRevision).max() ?? 0, times: times)
    }

    public func snapshots() async throws -> [ServiceSnapshot] {
        let entries = try await read(nil).entries
        let times = await leaseTimes(Set(entries.map(\.leaseID)))
        return Dictionary(grouping: entries, by: \.service).sorted { $0.key < $1.key }.map { service, entries in
            Self.snapshot(service, entries, index: entries.map(\.modRevision).max() ?? 0, times: times)
        }
    }

    // MARK: watch

    public func snapshotChanges(_ service: String) -> AsyncThrowingStream<ServiceSnapshot, any Error> {
        let registry = self
        return AsyncThrowingStream(bufferingPolicy: .bufferingNewest(16)) { continuation in
            let task = Task {
                do {
                    try RegistryValidation.validateService(service)
                } catch {
                    continuation.finish(throwing: error)
                    return
                }
                var last: ServiceSnapshot?
                var backoff: Duration = .milliseconds(100)
                while !Task.isCancelled {
                    do {
                        try await registry.follow(service) { snapshot in
                            backoff = .milliseconds(100)
                            if snapshot.endpoints != last?.endpoints || last == nil {
                                continuation.yield(snapshot)
                            }
                            last = snapshot
                        }
                    } catch is CancellationError {
                        break
                    } catch {
                        registry.logger.debug("etcd watch interrupted, resuming", metadata: [
                            "service": "\(service)", "error": "\(error)", "retryIn": "\(backoff)"])
                    }
                    if Task.isCancelled { break }
                    try? await Task.sleep(for: backoff)
                    backoff = min(backoff * 2, .seconds(2))
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Reads the service, reports it, then follows `/v3/watch` from the next revision, reporting the list after
    /// each batch of events, until the stream ends (etcd stopped, watch cancelled or compacted).
    func follow(_ service: String, _ report: (ServiceSnapshot) -> Void) async throws {
        let (entries, revision) = try await read(service)
        var current = Dictionary(entries.map { ($0.endpoint.id, $0) }, uniquingKeysWith: { $1 })
        func emit(_ index: Int64) {
            report(Self.snapshot(service, Array(current.values), index: index, times: [:]))
        }
        emit(entries.map(\.modRevision).max() ?? 0)

        let (key, end) = Self.range(service)
        var request = HTTPClientRequest(url: baseURL + "/v3/watch")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        let create: JSON = ["create_request": ["key": Self.b64(key), "range_end": Self.b64(end), "start_revision": String(revision + 1)]]
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: create)))
        let response: HTTPClientResponse
        do {
            response = try await MeshHTTP.client.execute(request, timeout: .hours(24 * 365))
        } catch let error as CancellationError {
            throw error
        } catch {
            throw RegistryError.unavailable("etcd watch: \(error)")
        }
        guard response.status == .ok else { throw RegistryError.unavailable("etcd watch: HTTP \(response.status.code)") }
        var pending = Data()
        for try await chunk in response.body {
            pending.append(contentsOf: chunk.readableBytesView)
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = pending[pending.startIndex..<newline]
                pending.removeSubrange(pending.startIndex...newline)
                guard !line.isEmpty, let message = (try? JSONSerialization.jsonObject(with: line)) as? JSON else { continue }
                guard let result = message["result"] as? JSON else {
                    throw RegistryError.unavailable("etcd watch: \(String(decoding: line.prefix(200), as: UTF8.self))")
                }
                if result["canceled"] as? Bool == true {
                    throw RegistryError.unavailable("etcd watch cancelled: \(result["cancel_reason"] ?? "compacted")")
                }
                guard let events = result["events"] as? [JSON], !events.isEmpty else { continue }
                for event in events {
                    guard let kv = event["kv"] as? JSON, let keyText = Self.unb64(kv["key"]) else { continue }
                    let id = String(keyText.dropFirst(key.count))
                    if (event["type"] as? String) == "DELETE" {
                        current[id] = nil
                    } else if let stored = Self.decode(kv) {
                        current[id] = stored
                    }
                }
                emit(Self.int64((result["header"] as? JSON)?["revision"]))
            }
        }
    }

    public func watch(_ service: String) -> AsyncThrowingStream<[ServiceEndpoint], any Error> {
        let changes = snapshotChanges(service)
        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    for try await snapshot in changes { continuation.yield(snapshot.endpoints.map(\.endpoint)) }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
