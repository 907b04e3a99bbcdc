import ApusCore
import Foundation
import Synchronization

/// The unprivileged uids (and equal gids) apusd hands out, one per running process it sandboxes, from a range it
/// owns (`--sandbox-uids`, default 200000-265535: above any account a distribution or a directory service makes).
/// No two live instances share a uid, so none can signal, trace or read another's files; a uid is reused only after
/// its process ended.
public final class SandboxIdentities: Sendable {
    public let range: ClosedRange<UInt32>
    private struct State {
        var inUse: Set<UInt32> = []
        var next: UInt32
    }
    private let state: Mutex<State>
    /// Per-uid `passwd` and `group` files (the instance's own user), made once per uid and reused.
    let directory: URL

    public static let defaultRange: ClosedRange<UInt32> = 200_000...265_535

    public init(range: ClosedRange<UInt32> = SandboxIdentities.defaultRange, directory: URL) {
        precondition(range.lowerBound > 0, "uid 0 is never an instance's")
        self.range = range
        self.directory = directory
        self.state = Mutex(State(next: range.lowerBound))
    }

    /// Parses `FIRST-LAST` (both inclusive, 1000...4294967294, at least 16 uids).
    public static func parseRange(_ text: String) -> ClosedRange<UInt32>? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let first = UInt32(parts[0]), let last = UInt32(parts[1]),
              first >= 1000, last < UInt32.max, last >= first, last - first >= 15 else { return nil }
        return first...last
    }

    /// A uid no live process holds.
    public func allocate() throws(ApusError) -> UInt32 {
        let uid = state.withLock { state -> UInt32? in
            guard state.inUse.count < range.count else { return nil }
            var candidate = state.next
            while state.inUse.contains(candidate) {
                candidate = candidate == range.upperBound ? range.lowerBound : candidate + 1
            }
            state.inUse.insert(candidate)
            state.next = candidate == range.upperBound ? range.lowerBound : candidate + 1
            return candidate
        }
        guard let uid else { throw ApusError(.unavailable, "every sandbox uid (\(range.lowerBound)-\(range.upperBound)) is in use") }
        return uid
    }

    public func release(_ uid: UInt32) {
        _ = state.withLock { $0.inUse.remove(uid) }
    }

    public var inUse: Int { state.withLock { $0.inUse.count } }

    /// The folder holding `passwd` and `group` that name `uid` (user and group `apus`, home /tmp, no shell).
    func accountFiles(for uid: UInt32) throws(ApusError) -> URL {
        let folder = directory.appendingPathComponent(String(uid))
        let passwd = folder.appendingPathComponent("passwd")
        if FileManager.default.fileExists(atPath: passwd.path) { return folder }
        do {
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            let group = "root:x:0:\nnogroup:x:65534:\napus:x:\(uid):\n"
            try Data(group.utf8).write(to: folder.appendingPathComponent("group"), options: .atomic)
            let users = "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                + "apus:x:\(uid):\(uid):Apus function instance:/tmp:/usr/sbin/nologin\n"
            try Data(users.utf8).write(to: passwd, options: .atomic)
        } catch {
            throw ApusError(.internal, "cannot write the sandbox account files in \(folder.path): \(error.localizedDescription)")
        }
        return folder
    }
}
