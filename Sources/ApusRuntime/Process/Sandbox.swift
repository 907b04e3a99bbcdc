import ApusCore
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Decides how instances are confined, and builds the argv that confines one.
///
/// With bubblewrap, apusd as root and `apus-sandbox-init` beside apusd, every layer is on: the instance joins its
/// own cgroup (memory, CPU, pids) before anything else runs, gets its own mount, pid, ipc, uts and cgroup
/// namespaces with system directories and its code read-only, a private size-capped `/tmp` and a minimal `/etc`,
/// then drops to an unprivileged uid of its own with no capabilities, `no_new_privs` and a seccomp filter, in a new
/// session. An apusd that is not root gets the same layers from user namespaces, its subordinate ids, a delegated
/// cgroup and CAP_NET_ADMIN (`detectUnprivileged`). Without some layer apusd refuses to start unless
/// `--insecure-sandbox` says so (`SandboxLayers`).
public struct Sandbox: Sendable {
    public enum Mode: String, Sendable {
        case bubblewrap = "bwrap"
        case rlimitsOnly = "rlimits"
    }

    public let mode: Mode
    let bwrapPath: String?
    let prlimitPath: String?
    /// `apus-sandbox-init` (privilege drop, seccomp, cgroup join); nil: instances keep apusd's uid.
    let initPath: String?
    /// Per-instance cgroups; nil: memory is limited by the address-space rlimit only.
    public let cgroups: InstanceCgroups?
    /// The uids instances run as; nil when there is no privilege drop.
    public let identities: SandboxIdentities?
    /// The instances' minimal `/etc`, prepared at start (`writeMinimalEtc`); nil: the host's is bound whole.
    let etcDirectory: URL?
    /// A network namespace per instance; nil: instances share apusd's network (loopback included).
    public let networks: InstanceNetworks?
    /// Why each missing layer is missing (for the start-up log and `apusd --check`).
    public let problems: [String]
    /// How apusd itself runs and gets each layer (root, or unprivileged with user namespaces, a delegated cgroup
    /// and CAP_NET_ADMIN): lines for the start-up log and `apusd --check`.
    public var privilege: [String] = []
    public static let openFilesLimit = 1024

    /// The mount point of the function's code inside the sandbox.
    public static let codeMount = "/code"
    /// The mount point of the bundled runtime files (bootstrap) inside the sandbox.
    public static let runtimeMount = "/apus"
    /// Where `apus-sandbox-init` is inside the sandbox.
    static let initMount = "/.apus-init"

    public init(mode: Mode, bwrapPath: String?, prlimitPath: String?, initPath: String? = nil, cgroups: InstanceCgroups? = nil,
                identities: SandboxIdentities? = nil, etcDirectory: URL? = nil, networks: InstanceNetworks? = nil, problems: [String] = []) {
        self.mode = mode
        self.bwrapPath = bwrapPath
        self.prlimitPath = prlimitPath
        self.initPath = initPath
        self.cgroups = cgroups
        self.identities = identities
        self.etcDirectory = etcDirectory
        self.networks = networks
        self.problems = problems
    }

    /// Which layers are on.
    public var layers: SandboxLayers {
        SandboxLayers(
            namespaces: mode == .bubblewrap,
            unprivileged: mode == .bubblewrap && identities != nil,
            seccomp: mode == .bubblewrap && identities != nil,
            minimalEtc: mode == .bubblewrap && etcDirectory != nil,
            cgroups: cgroups?.version.rawValue,
            network: mode == .bubblewrap && networks != nil,
            apusd: getuid() == 0 ? "root" : "unprivileged",
            uidMapping: identities == nil ? nil : (networks?.userNamespaces == nil ? "setuid" : "userns"))
    }

    /// Probes the host: bubblewrap when present and able to build a namespace here; the privilege layer when
    /// `initPath` exists and apusd is root (or, unprivileged, has what `detectUnprivileged` needs); cgroups when a
    /// tree with memory, cpu and pids is writable.
    /// `instanceNetwork`: the range instance links are numbered from (`--instance-network`); nil: no network
    /// namespaces (unit tests).
    public static func detect(
        disabled: Bool, logger: Logger, stateDirectory: URL? = nil, initPath: String? = nil,
        uids: ClosedRange<UInt32> = SandboxIdentities.defaultRange, cgroupRoot: URL = URL(fileURLWithPath: "/sys/fs/cgroup"),
        instanceNetwork: String? = nil
    ) -> Sandbox {
        let prlimit = findExecutable("prlimit")
        var problems: [String] = []
        if prlimit == nil {
            problems.append("prlimit not found: no open-file limit")
        }
        // Without the sandbox, instances run as apusd's plain children under rlimits (the address-space limit
        // stands in for memory): no cgroups, no uid of their own.
        let rlimitsOnly = "instances run as apusd's children with rlimits only (memory as address space, no cgroups, apusd's uid)"
        if disabled {
            problems.append("sandbox disabled by --no-sandbox: \(rlimitsOnly), and can see the whole host file system")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit, problems: problems)
        }
        guard let bwrap = findExecutable("bwrap") else {
            problems.append("bwrap (bubblewrap) not installed: no namespaces; \(rlimitsOnly), and can read the host file system, including the data directory")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit, problems: problems)
        }
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: bwrap)
        probe.arguments = systemMountArguments() + ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-pid", "--", "/bin/true"]
        probe.standardOutput = FileHandle.nullDevice
        probe.standardError = FileHandle.nullDevice
        do {
            try probe.run()
            probe.waitUntilExit()
        } catch {
            problems.append("cannot run bwrap (\(error)): no namespaces; \(rlimitsOnly)")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit, problems: problems)
        }
        guard probe.terminationStatus == 0 else {
            problems.append("bwrap cannot create namespaces on this host (exit \(probe.terminationStatus)); \(rlimitsOnly)")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit, problems: problems)
        }
        var identities: SandboxIdentities?
        var cgroups: InstanceCgroups?
        var etc: URL?
        var networks: InstanceNetworks?
        var privilege: [String] = []
        if let stateDirectory {
            if let initPath, FileManager.default.isExecutableFile(atPath: initPath) {
                if getuid() == 0 {
                    privilege.append("apusd runs as root: each instance is given its uid by apus-sandbox-init (setresuid) after bubblewrap")
                    identities = SandboxIdentities(range: uids, directory: stateDirectory.appendingPathComponent("users"))
                    // Instances join their cgroup through apus-sandbox-init, so cgroups come with it.
                    switch InstanceCgroups.detect(root: cgroupRoot) {
                    case .success(let found): cgroups = found
                    case .failure(let error): problems.append("no cgroups: \(error.message); memory is limited as address space")
                    }
                    if instanceNetwork == "none" {
                        problems.append("network namespaces disabled by --instance-network none: instances share the host's network and loopback")
                    } else if let instanceNetwork {
                        switch InstanceNetworks.setUp(range: instanceNetwork, logger: logger) {
                        case .success(let made): networks = made
                        case .failure(let error): problems.append("no network namespaces: \(error.message); instances share the host's network and loopback")
                        }
                    }
                } else {
                    let unprivileged = detectUnprivileged(logger: logger, initPath: initPath, uids: uids, cgroupRoot: cgroupRoot,
                                                          instanceNetwork: instanceNetwork,
                                                          usersDirectory: stateDirectory.appendingPathComponent("users"))
                    (identities, cgroups, networks) = (unprivileged.identities, unprivileged.cgroups, unprivileged.networks)
                    privilege += unprivileged.privilege
                    problems += unprivileged.problems
                }
            } else {
                problems.append("apus-sandbox-init not found\(initPath.map { " at \($0)" } ?? ""): instances keep apusd's uid and capabilities, no seccomp")
            }
            do {
                etc = try writeMinimalEtc(into: stateDirectory.appendingPathComponent("etc"))
            } catch {
                problems.append("cannot write the minimal /etc: \(error.localizedDescription)")
            }
        }
        var sandbox = Sandbox(mode: .bubblewrap, bwrapPath: bwrap, prlimitPath: prlimit, initPath: identities == nil ? nil : initPath,
                              cgroups: cgroups, identities: identities, etcDirectory: etc, networks: networks, problems: problems)
        sandbox.privilege = privilege
        return sandbox
    }

    /// The layers an apusd that is not root can still give every instance: a user namespace per instance (held with
    /// its network namespace, `InstanceNetworks.UserNamespaces`) mapping the instance's uid from its user's
    /// subordinate ids, cgroups below its own delegated cgroup, and network namespaces linked to the host with the
    /// CAP_NET_ADMIN it was granted. The uid layer needs the network's user namespaces, so without them (or without
    /// subordinate ids) instances get none of the three.
    static func detectUnprivileged(logger: Logger, initPath: String, uids: ClosedRange<UInt32>, cgroupRoot: URL, instanceNetwork: String?,
                                   usersDirectory: URL)
        -> (identities: SandboxIdentities?, cgroups: InstanceCgroups?, networks: InstanceNetworks?, privilege: [String], problems: [String])
    {
        var privilege = ["apusd runs unprivileged as uid \(getuid()): instances get user namespaces of their own"]
        var problems: [String] = []
        let ids: SubordinateIDs
        switch SubordinateIDs.detect(preferred: uids) {
        case .success(let found):
            ids = found
            privilege.append("uid mapping: \(found.description)")
        case .failure(let error):
            problems.append("apusd is not root and cannot map instance uids: \(error.message); instances cannot be given uids of their own (see docs/security.md, \"An unprivileged apusd\")")
            return (nil, nil, nil, privilege, problems)
        }
        var cgroups: InstanceCgroups?
        switch InstanceCgroups.detect(root: cgroupRoot, delegated: true) {
        case .success(let found):
            cgroups = found
            privilege.append("cgroups: \(found.version.rawValue), delegated to apusd (\(found.parents.values.map(\.path).sorted().joined(separator: ", ")))")
        case .failure(let error):
            problems.append("no cgroups: \(error.message); memory is limited as address space")
        }
        guard let instanceNetwork, instanceNetwork != "none" else {
            problems.append("network namespaces disabled by --instance-network none: an unprivileged apusd then has no user namespaces for instance uids either")
            return (nil, nil, nil, privilege, problems)
        }
        switch InstanceNetworks.setUp(range: instanceNetwork, userNamespaces: .init(initPath: initPath, ids: ids), logger: logger) {
        case .success(let networks):
            privilege.append("network: \(networks.privilegeDescription)")
            return (SandboxIdentities(range: ids.range, directory: usersDirectory), cgroups, networks, privilege, problems)
        case .failure(let error):
            problems.append("no network namespaces: \(error.message); an unprivileged apusd then has no user namespaces for instance uids either")
            return (nil, nil, nil, privilege, problems)
        }
    }

    /// Read-only system directories, keeping symlinked ones (merged /usr) as symlinks. No /etc: see `etcArguments`.
    static func systemMountArguments() -> [String] {
        var args = ["--ro-bind", "/usr", "/usr"]
        for path in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: path) {
                args += ["--symlink", target, path]
            } else if FileManager.default.fileExists(atPath: path) {
                args += ["--ro-bind", path, path]
            }
        }
        return args
    }

    /// Host entries of /etc an instance may read: what the dynamic linker, TLS, time zones, name resolution and
    /// language runtimes need. Never passwd/shadow/group of the host, sudoers, ssh, or anything of apusd's.
    static let hostEtcEntries = [
        "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl", "ca-certificates", "ca-certificates.conf",
        "localtime", "timezone", "mime.types", "protocols", "services", "gai.conf", "host.conf", "networks",
        "os-release", "debian_version", "python3", "python3.11", "python3.12", "python3.13",
    ]

    /// The instances' /etc, prepared once at start in one folder (one bind per instance instead of one per entry):
    /// generated hosts, resolv.conf, nsswitch.conf and hostname, empty passwd and group (each instance's own are
    /// bound over them), and copies of the allowed host entries (`hostEtcEntries`, `java-*`; symbolic links kept as
    /// links, `/etc/ssl/private` never). Host changes to those entries are seen after apusd restarts.
    static func writeMinimalEtc(into folder: URL) throws -> URL {
        let files = FileManager.default
        try? files.removeItem(at: folder)
        try files.createDirectory(at: folder, withIntermediateDirectories: true)
        chmod(folder.path, 0o755)
        let hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        let nsswitch = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"
        let resolv = (try? String(contentsOfFile: "/etc/resolv.conf", encoding: .utf8)) ?? ""
        for (name, text) in [("hosts", hosts), ("nsswitch.conf", nsswitch), ("resolv.conf", resolv), ("hostname", "apus\n"),
                             ("passwd", ""), ("group", "")] {
            try Data(text.utf8).write(to: folder.appendingPathComponent(name), options: .atomic)
            chmod(folder.appendingPathComponent(name).path, 0o644)
        }
        var entries = hostEtcEntries
        entries += ((try? files.contentsOfDirectory(atPath: "/etc")) ?? []).filter { $0.hasPrefix("java-") }.sorted()
        for name in entries {
            try copyHostEntry(URL(fileURLWithPath: "/etc/\(name)"), to: folder.appendingPathComponent(name))
        }
        return folder
    }

    /// Copies one host /etc entry, keeping symbolic links as links and modes as they are; `ssl/private` (TLS keys)
    /// is left out.
    static func copyHostEntry(_ source: URL, to target: URL) throws {
        let files = FileManager.default
        if let link = try? files.destinationOfSymbolicLink(atPath: source.path) {
            try files.createSymbolicLink(atPath: target.path, withDestinationPath: link)
            return
        }
        var isDirectory: ObjCBool = false
        guard files.fileExists(atPath: source.path, isDirectory: &isDirectory) else { return }
        guard isDirectory.boolValue else {
            guard files.isReadableFile(atPath: source.path) else { return }
            try files.copyItem(at: source, to: target)
            return
        }
        try files.createDirectory(at: target, withIntermediateDirectories: false)
        chmod(target.path, 0o755)
        for child in try files.contentsOfDirectory(atPath: source.path) where !(source.path == "/etc/ssl" && child == "private") {
            try copyHostEntry(source.appendingPathComponent(child), to: target.appendingPathComponent(child))
        }
    }

    /// The instance's /etc: the prepared folder, and its own passwd/group over the empty ones.
    func etcArguments(accounts: URL?) -> [String] {
        guard let etcDirectory else {
            return FileManager.default.fileExists(atPath: "/etc") ? ["--ro-bind", "/etc", "/etc"] : []
        }
        var args: [String] = ["--ro-bind", etcDirectory.path, "/etc"]
        if let accounts {
            args += ["--ro-bind", accounts.appendingPathComponent("passwd").path, "/etc/passwd"]
            args += ["--ro-bind", accounts.appendingPathComponent("group").path, "/etc/group"]
        }
        return args
    }

    /// The argv that runs `command` confined. `command` must already use in-sandbox paths. `uid` is the instance's
    /// own (from `identities`), `cgroup` the one it joins first; without them the older, weaker layers apply.
    func wrap(command: [String], codeDirectory: URL, runtimeDirectory: URL?, limits: ResourceLimits,
              uid: UInt32? = nil, cgroup: InstanceCgroup? = nil, network: InstanceNetworks.Network? = nil,
              egress: FunctionManifest.Egress = .all) throws(ApusError) -> [String] {
        let outer = outerArguments(limits: limits, cgroup: cgroup, network: network)
        return (outer.isEmpty ? [] : outer + ["--"])
            + (try confined(command: command, codeDirectory: codeDirectory, runtimeDirectory: runtimeDirectory, limits: limits, uid: uid,
                            defaultRoute: egress == .all ? network?.gateway : nil))
    }

    /// What runs before the sandbox: rlimits, then the cgroup and network namespace joins (its last element is
    /// the command to come, `--` in `wrap`, `--wait` for a sandbox slot). Empty when neither applies.
    func outerArguments(limits: ResourceLimits, cgroup: InstanceCgroup?, network: InstanceNetworks.Network? = nil) -> [String] {
        var argv: [String] = []
        if let prlimitPath {
            // Memory is the cgroup's limit where there is one (resident memory); the address-space rlimit is only
            // the fallback without cgroups.
            argv += [prlimitPath, "--nofile=\(Self.openFilesLimit)"] + (cgroup == nil ? ["--as=\(limits.memoryBytes)"] : []) + ["--"]
        }
        if let initPath, cgroup != nil || network != nil {
            argv += [initPath] + (cgroup?.procsFiles ?? []).flatMap { ["--cgroup", $0] }
            if let network {
                // An unprivileged apusd's namespace belongs to a user namespace of its own: joined first, it makes
                // the process root there (and nowhere else) for bubblewrap.
                if let user = network.userNamespacePath { argv += ["--userns", user] }
                argv += ["--netns", network.path]
            }
        } else if !argv.isEmpty {
            argv.removeLast()  // `wrap` adds the `--` back
        }
        return argv
    }

    /// The sandbox itself (bubblewrap and the privilege drop inside it) around `command`; `command` alone without
    /// bubblewrap. `defaultRoute`: the gateway of the instance's namespace when its egress reaches the world.
    func confined(command: [String], codeDirectory: URL, runtimeDirectory: URL?, limits: ResourceLimits,
                  uid: UInt32?, defaultRoute: UInt32? = nil) throws(ApusError) -> [String] {
        switch mode {
        case .rlimitsOnly:
            return command
        case .bubblewrap:
            var argv = try bubblewrapArguments(codeDirectory: codeDirectory, runtimeDirectory: runtimeDirectory,
                                               tmpBytes: limits.memoryBytes, uid: uid)
            if let uid, initPath != nil {
                argv += innerCommand(command: command, uid: uid, defaultRoute: defaultRoute)
            } else {
                argv += command
            }
            return argv
        }
    }

    /// A sandbox made ahead of its instance (a prebuilt sandbox slot): bubblewrap with the slot's own code folder,
    /// uid and /etc, around `apus-sandbox-init --wait`, which waits inside it — still root of the sandbox, before
    /// the route, the privilege drop and the filter — for `innerCommand` on its stdin. `tmpBytes` sizes /tmp before
    /// the function is known (its pages are charged to the instance's cgroup either way).
    func waitingInside(codeDirectory: URL, runtimeDirectory: URL?, tmpBytes: Int64, uid: UInt32) throws(ApusError) -> [String] {
        guard mode == .bubblewrap, initPath != nil else {
            throw ApusError(.internal, "a sandbox made ahead needs bubblewrap and apus-sandbox-init")
        }
        return try bubblewrapArguments(codeDirectory: codeDirectory, runtimeDirectory: runtimeDirectory, tmpBytes: tmpBytes, uid: uid)
            + [Self.initMount, "--wait"]
    }

    /// What the `apus-sandbox-init` inside the sandbox runs `command` with: the route (for `egress: all`), every
    /// capability dropped, the instance's uid and gid, the seccomp filter. In-sandbox paths.
    func innerCommand(command: [String], uid: UInt32, defaultRoute: UInt32?) -> [String] {
        var argv = [Self.initMount]
        if let defaultRoute { argv += ["--default-route", InstanceEndpoint.format(defaultRoute)] }
        argv += ["--drop-caps", "--gid", String(uid), "--uid", String(uid), "--seccomp", "--"]
        return argv + command
    }

    /// bubblewrap's part of the argv, up to the command it runs (`--chdir /code --`).
    private func bubblewrapArguments(codeDirectory: URL, runtimeDirectory: URL?, tmpBytes: Int64, uid: UInt32?) throws(ApusError) -> [String] {
        var argv = [bwrapPath!, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--hostname", "apus"]
        argv += Self.systemMountArguments()
        let accounts = try uid.flatMap { uid throws(ApusError) in try identities?.accountFiles(for: uid) }
        argv += etcArguments(accounts: accounts)
        argv += ["--proc", "/proc", "--dev", "/dev"]
        // /tmp: private, world-writable with the sticky bit, never larger than the memory limit (its pages are
        // also charged to the instance's cgroup).
        argv += ["--perms", "1777", "--size", String(tmpBytes), "--tmpfs", "/tmp"]
        argv += ["--ro-bind", codeDirectory.path, Self.codeMount]
        if let runtimeDirectory {
            argv += ["--ro-bind", runtimeDirectory.path, Self.runtimeMount]
        }
        if uid != nil, let initPath {
            argv += ["--ro-bind", initPath, Self.initMount]
        }
        return argv + ["--chdir", Self.codeMount, "--"]
    }

    static func findExecutable(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") + ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }
}

/// Which isolation layers are on; logged at start, printed by `apusd --check`, shown in `/v1/info`.
public struct SandboxLayers: Sendable, Equatable, Codable {
    /// Mount, pid, ipc, uts and cgroup namespaces (bubblewrap).
    public var namespaces: Bool
    /// Own unprivileged uid/gid, no capabilities, no_new_privs.
    public var unprivileged: Bool
    /// The seccomp filter.
    public var seccomp: Bool
    /// The minimal /etc instead of the host's.
    public var minimalEtc: Bool
    /// "v1" or "v2" when memory, CPU and pids are limited by cgroups; nil without.
    public var cgroups: String?
    /// A network namespace per instance (`InstanceNetworks`).
    public var network: Bool = false
    /// How apusd runs: "root" or "unprivileged".
    public var apusd: String? = nil
    /// How instances get their uids: "setuid" (a root apusd) or "userns" (an unprivileged apusd's user namespaces).
    public var uidMapping: String? = nil

    /// Whether every layer is on.
    public var complete: Bool { namespaces && unprivileged && seccomp && minimalEtc && cgroups != nil && network }

    public var summary: String {
        [("namespaces", namespaces), ("uid", unprivileged), ("seccomp", seccomp), ("etc", minimalEtc)]
            .map { "\($0.0)=\($0.1 ? "on" : "off")" }.joined(separator: " ")
            + " cgroups=\(cgroups ?? "off") netns=\(network ? "on" : "off")"
            + (apusd.map { " apusd=\($0)" } ?? "") + (uidMapping.map { " uidmap=\($0)" } ?? "")
    }
}
