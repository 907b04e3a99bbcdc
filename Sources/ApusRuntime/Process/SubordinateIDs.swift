#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import Foundation

/// The uids and gids an unprivileged apusd may hand to instances: a range of its user's subordinate ids
/// (`/etc/subuid`, `/etc/subgid`, e.g. `apus:200000:65536`), mapped into each instance's user namespace with the
/// setuid helpers `newuidmap`/`newgidmap` (Debian's `uidmap`). Each namespace maps its uid 0 to apusd's own uid (so
/// bubblewrap runs as root of the namespace, with no privilege on the host) and the range onto itself, so an
/// instance's uid is the same number inside and on the host, as with a root apusd.
public struct SubordinateIDs: Sendable, Equatable {
    /// Ids mapped identically (`first...last` inside = outside); the same for uids and gids.
    public let range: ClosedRange<UInt32>
    /// apusd's own uid and gid (uid/gid 0 of each namespace).
    public let uid: UInt32
    public let gid: UInt32
    let newuidmap: String
    let newgidmap: String

    /// At most this many ids are used (as many as `--sandbox-uids` offers by default).
    static let maximumCount: UInt32 = 65_536

    /// Finds the subordinate range of the user apusd runs as, present in both files, with the helpers installed.
    /// `preferred`: the range `--sandbox-uids` names, used when the subordinate ranges contain it.
    public static func detect(preferred: ClosedRange<UInt32>? = nil, subuid: String = "/etc/subuid", subgid: String = "/etc/subgid")
        -> Result<SubordinateIDs, ApusError>
    {
        let uid = getuid()
        let gid = getgid()
        guard let newuidmap = Sandbox.findExecutable("newuidmap"), let newgidmap = Sandbox.findExecutable("newgidmap") else {
            return .failure(ApusError(.unavailable, "newuidmap/newgidmap not found (Debian package uidmap)"))
        }
        let name = userName(uid)
        let uids = ranges(in: subuid, user: name, id: uid)
        let gids = ranges(in: subgid, user: name, id: gid)
        // Ranges present in both files (uids and gids are handed out as equal pairs).
        let shared = uids.compactMap { u -> ClosedRange<UInt32>? in
            gids.lazy.compactMap { g -> ClosedRange<UInt32>? in
                let low = max(u.lowerBound, g.lowerBound), high = min(u.upperBound, g.upperBound)
                return low <= high ? low...high : nil
            }.first
        }
        if let preferred, shared.contains(where: { $0.contains(preferred.lowerBound) && $0.contains(preferred.upperBound) }) {
            return .success(SubordinateIDs(range: preferred, uid: uid, gid: gid, newuidmap: newuidmap, newgidmap: newgidmap))
        }
        guard let best = shared.filter({ $0.lowerBound > 0 && $0.count >= 16 }).max(by: { $0.count < $1.count }) else {
            return .failure(ApusError(.unavailable, "user \(name ?? String(uid)) has no subordinate uid and gid range of at least 16 ids in common (\(subuid), \(subgid); e.g. usermod --add-subuids 200000-265535 --add-subgids 200000-265535 \(name ?? "USER"))"))
        }
        let last = best.lowerBound + min(UInt32(best.count), maximumCount) - 1
        return .success(SubordinateIDs(range: best.lowerBound...last, uid: uid, gid: gid, newuidmap: newuidmap, newgidmap: newgidmap))
    }

    /// The `NAME:FIRST:COUNT` (or `UID:FIRST:COUNT`) lines of `file` for the user.
    static func ranges(in file: String, user: String?, id: UInt32) -> [ClosedRange<UInt32>] {
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { return [] }
        return parse(text, user: user, id: id)
    }

    static func parse(_ text: String, user: String?, id: UInt32) -> [ClosedRange<UInt32>] {
        var found: [ClosedRange<UInt32>] = []
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: ":", omittingEmptySubsequences: false)
            guard fields.count == 3, fields[0] == String(id) || (user != nil && fields[0] == user!),
                  let first = UInt32(fields[1]), let count = UInt32(fields[2]), count > 0,
                  first <= UInt32.max - count else { continue }
            found.append(first...(first + count - 1))
        }
        return found
    }

    static func userName(_ uid: uid_t) -> String? {
        guard let entry = getpwuid(uid), let name = entry.pointee.pw_name else { return nil }
        return String(cString: name)
    }

    /// The maps of the user namespace `pid` made (`apus-sandbox-init --hold`): 0 → apusd, the range onto itself.
    func map(pid: Int32) throws(ApusError) {
        let first = String(range.lowerBound), count = String(range.count)
        _ = try CodeArchive.run(newuidmap, [String(pid), "0", String(uid), "1", first, first, count], input: nil, failureCode: .unavailable)
        _ = try CodeArchive.run(newgidmap, [String(pid), "0", String(gid), "1", first, first, count], input: nil, failureCode: .unavailable)
    }

    public var description: String {
        "uids/gids \(range.lowerBound)-\(range.upperBound) mapped per instance with newuidmap/newgidmap (uid 0 of each user namespace is apusd's uid \(uid))"
    }
}
