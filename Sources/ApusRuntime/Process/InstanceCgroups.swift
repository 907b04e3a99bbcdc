#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import Foundation
import Logging

/// What one instance may use: resident memory (its `/tmp` included), CPU time and processes.
public struct ResourceLimits: Sendable, Equatable {
    /// Resident memory in bytes (the cgroup memory limit; no swap beyond it).
    public var memoryBytes: Int64
    /// CPU in thousandths of a core (cfs quota per 100 ms period): 500 = half a core.
    public var cpuMillis: Int
    /// Processes and threads together.
    public var pids: Int

    public init(memoryBytes: Int64, cpuMillis: Int, pids: Int) {
        self.memoryBytes = memoryBytes
        self.cpuMillis = cpuMillis
        self.pids = pids
    }

    public init(_ manifest: FunctionManifest) {
        self.init(memoryBytes: manifest.memory, cpuMillis: manifest.cpuMillis, pids: manifest.pids)
    }
}

/// The cgroups apusd makes for instances, one per instance, on cgroup v2 (one unified tree) or v1 (the memory, cpu
/// and pids hierarchies). An instance joins its cgroup before bubblewrap starts (`apus-sandbox-init --cgroup`), so
/// everything it ever runs is counted; the cgroup goes when the instance does, after its OOM kills are read.
public final class InstanceCgroups: Sendable {
    public enum Version: String, Sendable {
        case v1
        case v2
    }

    public let version: Version
    /// v2: the directory instance cgroups are made in. v1: one such directory per controller.
    let parents: [String: URL]
    /// CFS period: quota is expressed per this many microseconds.
    static let cpuPeriodMicros = 100_000

    init(version: Version, parents: [String: URL]) {
        self.version = version
        self.parents = parents
    }

    /// Finds a cgroup tree apusd can make instance cgroups in with the memory, cpu and pids controllers, or says why
    /// there is none. v2 is preferred where its controllers are available (most hosts); v1 otherwise.
    /// - Parameters:
    ///   - root: where cgroup file systems are mounted (tests pass a directory of their own).
    ///   - ownCgroup: this process's cgroup (the `0::` line of /proc/self/cgroup) for delegated v2 subtrees.
    ///   - delegated: apusd is not root and may write only below its own cgroup (what systemd's `Delegate=yes` gives
    ///     it, or an operator's `chown`): on v1 too, instance cgroups go in `<own cgroup>/instances` of each
    ///     hierarchy rather than in `/apus`.
    ///   - ownV1Cgroups: this process's v1 cgroups by controller (tests); read from /proc/self/cgroup otherwise.
    public static func detect(root: URL = URL(fileURLWithPath: "/sys/fs/cgroup"), ownCgroup: String? = nil, delegated: Bool = false,
                              ownV1Cgroups: [String: String]? = nil) -> Result<InstanceCgroups, ApusError> {
        let files = FileManager.default
        let controllersFile = root.appendingPathComponent("cgroup.controllers")
        if let controllers = try? String(contentsOf: controllersFile, encoding: .utf8) {
            let available = Set(controllers.split(whereSeparator: \.isWhitespace).map(String.init))
            let missing = ["memory", "cpu", "pids"].filter { !available.contains($0) }
            guard missing.isEmpty else {
                return .failure(ApusError(.unavailable, "cgroup v2 at \(root.path) lacks the \(missing.joined(separator: ", ")) controller(s)"))
            }
            return prepareV2(root: root, ownCgroup: ownCgroup ?? Self.ownV2Cgroup())
        }
        var parents: [String: URL] = [:]
        for controller in ["memory", "cpu", "pids"] {
            // Debian and most distributions mount cpu together with cpuacct; both names lead to the same tree.
            let candidates = [controller, controller == "cpu" ? "cpu,cpuacct" : controller, controller == "cpu" ? "cpuacct,cpu" : controller]
            guard let mount = candidates.map({ root.appendingPathComponent($0) }).first(where: {
                files.fileExists(atPath: $0.appendingPathComponent("cgroup.procs").path)
            }) else {
                return .failure(ApusError(.unavailable, "no cgroup v2 with controllers and no v1 \(controller) hierarchy under \(root.path)"))
            }
            var parent = mount.appendingPathComponent("apus")
            if delegated {
                let own = (ownV1Cgroups ?? Self.ownV1Cgroups())[controller]?.trimmingCharacters(in: CharacterSet(charactersIn: "/")) ?? ""
                guard !own.isEmpty else {
                    return .failure(ApusError(.unavailable, "apusd is not root and its \(controller) cgroup is the root of \(mount.path): nothing was delegated to it (systemd Delegate=yes, see Deploy/systemd)"))
                }
                parent = mount.appendingPathComponent(own).appendingPathComponent("instances")
            }
            do {
                try files.createDirectory(at: parent, withIntermediateDirectories: true)
            } catch {
                return .failure(ApusError(.unavailable, "cannot make \(parent.path): \(error.localizedDescription) (apusd needs root or a delegated cgroup)"))
            }
            parents[controller] = parent
        }
        return .success(InstanceCgroups(version: .v1, parents: parents))
    }

    /// v2: instance cgroups go in `<own cgroup>/instances` with memory, cpu and pids enabled down to them. At the
    /// root of the tree that is `/apus/instances`; in a subtree systemd delegated (`Delegate=yes`) apusd first moves
    /// itself into a leaf (`<own>/apusd`), since a cgroup that holds processes cannot hand controllers to children.
    static func prepareV2(root: URL, ownCgroup: String) -> Result<InstanceCgroups, ApusError> {
        let files = FileManager.default
        let own = ownCgroup.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        let base = own.isEmpty ? root.appendingPathComponent("apus") : root.appendingPathComponent(own)
        let instances = base.appendingPathComponent("instances")
        do {
            if !own.isEmpty {
                let leaf = base.appendingPathComponent("apusd")
                try files.createDirectory(at: leaf, withIntermediateDirectories: true)
                try write("\(getpid())", to: leaf.appendingPathComponent("cgroup.procs"))
            } else {
                try files.createDirectory(at: base, withIntermediateDirectories: true)
                try write("+memory +cpu +pids", to: root.appendingPathComponent("cgroup.subtree_control"))
            }
            try write("+memory +cpu +pids", to: base.appendingPathComponent("cgroup.subtree_control"))
            try files.createDirectory(at: instances, withIntermediateDirectories: true)
            try write("+memory +cpu +pids", to: instances.appendingPathComponent("cgroup.subtree_control"))
        } catch {
            return .failure(ApusError(.unavailable, "cannot prepare cgroup v2 subtree \(base.path): \(error) (apusd needs root or a subtree delegated with Delegate=yes)"))
        }
        return .success(InstanceCgroups(version: .v2, parents: ["unified": instances]))
    }

    /// This process's v1 cgroups by controller (`4:memory:/path`, `1:cpu,cpuacct:/path` lines of /proc/self/cgroup).
    static func ownV1Cgroups(_ text: String? = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8)) -> [String: String] {
        var found: [String: String] = [:]
        for line in (text ?? "").split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3, !fields[1].isEmpty else { continue }
            for controller in fields[1].split(separator: ",") where !controller.contains("=") { found[String(controller)] = String(fields[2]) }
        }
        return found
    }

    /// The `0::/path` entry of /proc/self/cgroup (v2), or "/" when there is none.
    static func ownV2Cgroup() -> String {
        guard let text = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8) else { return "/" }
        for line in text.split(separator: "\n") where line.hasPrefix("0::") {
            return String(line.dropFirst(3))
        }
        return "/"
    }

    /// Makes the cgroup of one instance with `limits`. `name` is unique per process apusd starts.
    public func create(name: String, limits: ResourceLimits) throws(ApusError) -> InstanceCgroup {
        let directories = parents.mapValues { $0.appendingPathComponent(name) }
        for directory in directories.values {
            do {
                try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: false)
            } catch {
                throw ApusError(.internal, "cannot make cgroup \(directory.path): \(error.localizedDescription)")
            }
        }
        let cgroup = InstanceCgroup(version: version, directories: directories)
        do throws(ApusError) {
            try cgroup.apply(limits)
        } catch {
            cgroup.remove()
            throw error
        }
        return cgroup
    }

    /// Tests lay out a cgroup tree in an ordinary directory, where the kernel's interface files do not appear by
    /// themselves: writes there create the file.
    nonisolated(unsafe) static var createsFilesForTests = false

    static func write(_ text: String, to file: URL) throws(ApusError) {
        let fd = createsFilesForTests ? open(file.path, O_WRONLY | O_CLOEXEC | O_CREAT | O_TRUNC, 0o644) : open(file.path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ApusError(.internal, "cannot open \(file.path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else {
            throw ApusError(.internal, "cannot write \"\(text)\" to \(file.path): \(String(cString: strerror(errno)))")
        }
    }
}

/// The cgroup(s) of one instance.
public final class InstanceCgroup: Sendable {
    let version: InstanceCgroups.Version
    /// v2: "unified"; v1: "memory", "cpu", "pids".
    let directories: [String: URL]

    init(version: InstanceCgroups.Version, directories: [String: URL]) {
        self.version = version
        self.directories = directories
    }

    /// The `cgroup.procs` files a process writes itself into to join (one per hierarchy).
    public var procsFiles: [String] {
        directories.keys.sorted().map { directories[$0]!.appendingPathComponent("cgroup.procs").path }
    }

    /// Sets (or changes: a prewarmed process gets its function's limits) memory, CPU and pids limits.
    public func apply(_ limits: ResourceLimits) throws(ApusError) {
        let quota = limits.cpuMillis * InstanceCgroups.cpuPeriodMicros / 1000
        switch version {
        case .v2:
            let dir = directories["unified"]!
            try InstanceCgroups.write(String(limits.memoryBytes), to: dir.appendingPathComponent("memory.max"))
            Self.writeIfPresent("0", dir.appendingPathComponent("memory.swap.max"))
            try InstanceCgroups.write("\(quota) \(InstanceCgroups.cpuPeriodMicros)", to: dir.appendingPathComponent("cpu.max"))
            try InstanceCgroups.write(String(limits.pids), to: dir.appendingPathComponent("pids.max"))
        case .v1:
            let memory = directories["memory"]!
            let memsw = memory.appendingPathComponent("memory.memsw.limit_in_bytes")
            let hasMemsw = FileManager.default.fileExists(atPath: memsw.path)
            // memsw must stay >= the memory limit: raise memory first when growing, memsw first when shrinking.
            let currentText = Self.read(memory.appendingPathComponent("memory.limit_in_bytes"))?.trimmingCharacters(in: .whitespacesAndNewlines)
            let current = currentText.flatMap { Int64($0) } ?? Int64.max
            if hasMemsw && limits.memoryBytes > current {
                try InstanceCgroups.write(String(limits.memoryBytes), to: memsw)
                try InstanceCgroups.write(String(limits.memoryBytes), to: memory.appendingPathComponent("memory.limit_in_bytes"))
            } else {
                try InstanceCgroups.write(String(limits.memoryBytes), to: memory.appendingPathComponent("memory.limit_in_bytes"))
                if hasMemsw { try InstanceCgroups.write(String(limits.memoryBytes), to: memsw) }
            }
            Self.writeIfPresent("0", memory.appendingPathComponent("memory.swappiness"))
            let cpu = directories["cpu"]!
            try InstanceCgroups.write(String(InstanceCgroups.cpuPeriodMicros), to: cpu.appendingPathComponent("cpu.cfs_period_us"))
            try InstanceCgroups.write(String(quota), to: cpu.appendingPathComponent("cpu.cfs_quota_us"))
            try InstanceCgroups.write(String(limits.pids), to: directories["pids"]!.appendingPathComponent("pids.max"))
        }
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup.
    public var oomKills: Int {
        let file = switch version {
        case .v2: directories["unified"]!.appendingPathComponent("memory.events")
        case .v1: directories["memory"]!.appendingPathComponent("memory.oom_control")
        }
        guard let text = Self.read(file) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("oom_kill ") {
            return Int(line.dropFirst("oom_kill ".count).trimmingCharacters(in: .whitespaces)) ?? 0
        }
        return 0
    }

    /// Kills what is left in the cgroup and removes it (retrying while the kernel still tears processes down).
    public func remove() {
        for directory in directories.values {
            for attempt in 0..<50 {
                if rmdir(directory.path) == 0 || errno == ENOENT { break }
                if let procs = Self.read(directory.appendingPathComponent("cgroup.procs")) {
                    for pid in procs.split(separator: "\n").compactMap({ pid_t($0) }) { kill(pid, SIGKILL) }
                }
                usleep(useconds_t(min(20_000, 1_000 * (attempt + 1))))
            }
        }
    }

    static func read(_ file: URL) -> String? {
        try? String(contentsOf: file, encoding: .utf8)
    }

    static func writeIfPresent(_ text: String, _ file: URL) {
        guard FileManager.default.fileExists(atPath: file.path) else { return }
        try? InstanceCgroups.write(text, to: file)
    }
}
