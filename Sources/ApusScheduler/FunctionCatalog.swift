import ApusCore
import Synchronization

/// The routing snapshot the gateway reads on every request: each function's release and versions.
/// The control plane replaces an entry after every change it commits to the store.
public final class FunctionCatalog: Sendable {
    public struct Entry: Sendable {
        public var record: FunctionRecord
        public var versions: [Int: FunctionVersion]

        public init(record: FunctionRecord, versions: [FunctionVersion]) {
            self.record = record
            self.versions = Dictionary(uniqueKeysWithValues: versions.map { ($0.number, $0) })
        }
    }

    private let entries = Mutex<[String: Entry]>([:])

    public init() {}

    public func update(_ entry: Entry) {
        entries.withLock { $0[entry.record.name] = entry }
    }

    public func remove(_ function: String) {
        _ = entries.withLock { $0.removeValue(forKey: function) }
    }

    public func entry(_ function: String) -> Entry? {
        entries.withLock { $0[function] }
    }

    public var functionNames: [String] {
        entries.withLock { Array($0.keys) }
    }

    /// Chooses the version that serves a request: the pinned one if given, else by release weight.
    public func route(function: String, pinnedVersion: Int?, roll: Int = Int.random(in: 0..<100)) throws(ApusError) -> FunctionVersion {
        guard let entry = entry(function) else {
            throw ApusError(.notFound, "no function named \(function)")
        }
        if let pinnedVersion {
            guard let version = entry.versions[pinnedVersion] else {
                throw ApusError(.notFound, "function \(function) has no version \(pinnedVersion)")
            }
            return version
        }
        guard let number = entry.record.release.pickVersion(roll: roll), let version = entry.versions[number] else {
            throw ApusError(.unavailable, "function \(function) has no released version")
        }
        return version
    }
}
