import ApusCore
import Foundation
import Logging
import Testing

@testable import ApusRuntime

/// The cgroup layouts, against directories laid out as cgroup trees (the kernel's own files are written by the
/// code under test; `createsFilesForTests` makes plain files stand in for them).
@Suite("instance cgroups", .serialized)
struct InstanceCgroupsTests {
    let root: URL

    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("cgroup-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        InstanceCgroups.createsFilesForTests = true
    }

    func read(_ path: String) -> String? {
        try? String(contentsOf: root.appendingPathComponent(path), encoding: .utf8)
    }

    func write(_ text: String, _ path: String) throws {
        let url = root.appendingPathComponent(path)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(text.utf8).write(to: url)
    }

    @Test func v2AtTheRootOfTheTree() throws {
        try write("cpuset cpu io memory hugetlb pids rdma misc\n", "cgroup.controllers")
        let cgroups = try InstanceCgroups.detect(root: root, ownCgroup: "/").get()
        #expect(cgroups.version == .v2)
        #expect(read("cgroup.subtree_control") == "+memory +cpu +pids")
        #expect(read("apus/cgroup.subtree_control") == "+memory +cpu +pids")
        #expect(read("apus/instances/cgroup.subtree_control") == "+memory +cpu +pids")
        let cgroup = try cgroups.create(name: "i-1", limits: ResourceLimits(memoryBytes: 128 << 20, cpuMillis: 250, pids: 64))
        #expect(read("apus/instances/i-1/memory.max") == "134217728")
        #expect(read("apus/instances/i-1/cpu.max") == "25000 100000")
        #expect(read("apus/instances/i-1/pids.max") == "64")
        #expect(cgroup.procsFiles == [root.appendingPathComponent("apus/instances/i-1/cgroup.procs").path])
        #expect(cgroup.oomKills == 0)
        try write("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n", "apus/instances/i-1/memory.events")
        #expect(cgroup.oomKills == 1)
        // A prewarmed process taking on a function's limits.
        try cgroup.apply(ResourceLimits(memoryBytes: 1 << 30, cpuMillis: 2000, pids: 512))
        #expect(read("apus/instances/i-1/cpu.max") == "200000 100000")
    }

    @Test func v2InASubtreeSystemdDelegated() throws {
        try write("cpu memory pids\n", "cgroup.controllers")
        try FileManager.default.createDirectory(at: root.appendingPathComponent("system.slice/apusd.service"), withIntermediateDirectories: true)
        let cgroups = try InstanceCgroups.detect(root: root, ownCgroup: "/system.slice/apusd.service").get()
        // apusd moved itself into a leaf before handing controllers to its children.
        #expect(read("system.slice/apusd.service/apusd/cgroup.procs") == String(getpid()))
        #expect(read("system.slice/apusd.service/cgroup.subtree_control") == "+memory +cpu +pids")
        #expect(read("system.slice/apusd.service/instances/cgroup.subtree_control") == "+memory +cpu +pids")
        _ = try cgroups.create(name: "i-2", limits: ResourceLimits(memoryBytes: 64 << 20, cpuMillis: 1000, pids: 512))
        #expect(read("system.slice/apusd.service/instances/i-2/memory.max") == "67108864")
    }

    @Test func v2WithoutTheControllersIsRefusedWithTheReason() throws {
        try write("cpuset io hugetlb\n", "cgroup.controllers")
        guard case .failure(let error) = InstanceCgroups.detect(root: root, ownCgroup: "/") else {
            Issue.record("a v2 tree without memory/cpu/pids was accepted")
            return
        }
        #expect(error.message.contains("memory, cpu, pids"))
    }

    @Test func v1Hierarchies() throws {
        for controller in ["memory", "cpu", "pids"] { try write("", "\(controller)/cgroup.procs") }
        let cgroups = try InstanceCgroups.detect(root: root).get()
        #expect(cgroups.version == .v1)
        let cgroup = try cgroups.create(name: "i-3", limits: ResourceLimits(memoryBytes: 256 << 20, cpuMillis: 500, pids: 100))
        #expect(read("memory/apus/i-3/memory.limit_in_bytes") == "268435456")
        #expect(read("cpu/apus/i-3/cpu.cfs_period_us") == "100000")
        #expect(read("cpu/apus/i-3/cpu.cfs_quota_us") == "50000")
        #expect(read("pids/apus/i-3/pids.max") == "100")
        #expect(cgroup.procsFiles.count == 3)
        try write("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "memory/apus/i-3/memory.oom_control")
        #expect(cgroup.oomKills == 2)
    }

    @Test func v1BelowTheCgroupsDelegatedToAnUnprivilegedApusd() throws {
        for controller in ["memory", "cpu", "pids"] { try write("", "\(controller)/cgroup.procs") }
        let own = InstanceCgroups.ownV1Cgroups("9:name=systemd:/x\n8:pids:/deleg\n4:memory:/deleg\n1:cpu,cpuacct:/deleg\n0::/\n")
        #expect(own["cpu"] == "/deleg" && own["cpuacct"] == "/deleg" && own["memory"] == "/deleg" && own["name=systemd"] == nil)
        let cgroups = try InstanceCgroups.detect(root: root, delegated: true, ownV1Cgroups: own).get()
        _ = try cgroups.create(name: "i-4", limits: ResourceLimits(memoryBytes: 64 << 20, cpuMillis: 500, pids: 32))
        #expect(read("memory/deleg/instances/i-4/memory.limit_in_bytes") == "67108864")
        #expect(read("pids/deleg/instances/i-4/pids.max") == "32")
        #expect(read("memory/apus/i-4/memory.limit_in_bytes") == nil)
    }

    @Test func v1WithNothingDelegatedIsRefusedWithTheReason() throws {
        for controller in ["memory", "cpu", "pids"] { try write("", "\(controller)/cgroup.procs") }
        guard case .failure(let error) = InstanceCgroups.detect(root: root, delegated: true, ownV1Cgroups: ["memory": "/", "cpu": "/", "pids": "/"]) else {
            Issue.record("an unprivileged apusd at the root of the v1 hierarchies was given cgroups")
            return
        }
        #expect(error.message.contains("nothing was delegated"))
    }

    @Test func noCgroupTreeIsRefusedWithTheReason() {
        guard case .failure(let error) = InstanceCgroups.detect(root: root) else {
            Issue.record("an empty directory was taken for a cgroup tree")
            return
        }
        #expect(error.message.contains("no cgroup v2 with controllers and no v1 memory hierarchy"))
    }
}

@Suite("sandbox identities and argv")
struct SandboxArgvTests {
    @Test func uidsAreDistinctAndReusedOnlyAfterRelease() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("uids-\(UUID().uuidString)")
        let ids = SandboxIdentities(range: 300_000...300_015, directory: directory)
        var taken: [UInt32] = []
        for _ in 0..<16 { taken.append(try ids.allocate()) }
        #expect(Set(taken).count == 16 && taken.allSatisfy { (300_000...300_015).contains($0) })
        #expect(throws: ApusError.self) { try ids.allocate() }
        ids.release(taken[3])
        #expect(try ids.allocate() == taken[3])
        let accounts = try ids.accountFiles(for: taken[0])
        let passwd = try String(contentsOf: accounts.appendingPathComponent("passwd"), encoding: .utf8)
        #expect(passwd.contains("apus:x:300000:300000:"))
    }

    @Test(arguments: ["200000-265535", "1000-1015"])
    func rangesParse(text: String) {
        #expect(SandboxIdentities.parseRange(text) != nil)
    }

    @Test(arguments: ["0-100000", "999-5000", "5000-5001", "10-", "a-b", "300000-200000"])
    func badRangesAreRefused(text: String) {
        #expect(SandboxIdentities.parseRange(text) == nil)
    }

    @Test func everyLayerIsInTheArgv() throws {
        let state = FileManager.default.temporaryDirectory.appendingPathComponent("sandbox-\(UUID().uuidString)")
        let etc = try Sandbox.writeMinimalEtc(into: state.appendingPathComponent("etc"))
        let identities = SandboxIdentities(range: 400_000...400_100, directory: state.appendingPathComponent("users"))
        let sandbox = Sandbox(mode: .bubblewrap, bwrapPath: "/usr/bin/bwrap", prlimitPath: "/usr/bin/prlimit",
                              initPath: "/opt/apus/apus-sandbox-init", identities: identities, etcDirectory: etc)
        let cgroup = InstanceCgroup(version: .v1, directories: ["memory": URL(fileURLWithPath: "/cg/memory/apus/i-9"),
                                                               "cpu": URL(fileURLWithPath: "/cg/cpu/apus/i-9"),
                                                               "pids": URL(fileURLWithPath: "/cg/pids/apus/i-9")])
        let argv = try sandbox.wrap(command: ["/usr/bin/python3", "/apus/bootstrap.py"], codeDirectory: URL(fileURLWithPath: "/data/code/x"),
                                    runtimeDirectory: URL(fileURLWithPath: "/rt"), limits: ResourceLimits(memoryBytes: 1 << 27, cpuMillis: 500, pids: 64),
                                    uid: 400_007, cgroup: cgroup)
        let line = argv.joined(separator: " ")
        // prlimit without an address-space limit (the cgroup has the memory limit), then the cgroup join, then bwrap.
        #expect(line.hasPrefix("/usr/bin/prlimit --nofile=1024 -- /opt/apus/apus-sandbox-init --cgroup /cg/cpu/apus/i-9/cgroup.procs --cgroup /cg/memory/apus/i-9/cgroup.procs --cgroup /cg/pids/apus/i-9/cgroup.procs -- /usr/bin/bwrap "))
        #expect(!line.contains("--as="))
        #expect(line.contains("--new-session") && line.contains("--unshare-pid") && line.contains("--die-with-parent"))
        #expect(line.contains("--perms 1777 --size 134217728 --tmpfs /tmp"))
        #expect(line.contains("--ro-bind \(etc.path) /etc --ro-bind \(state.path)/users/400007/passwd /etc/passwd"))
        #expect(!line.contains("--ro-bind /etc /etc"), "never the host's whole /etc")
        // The prepared /etc: generated files, placeholders for the accounts, host entries copied, no TLS keys.
        let listing = try FileManager.default.contentsOfDirectory(atPath: etc.path)
        #expect(Set(["hosts", "resolv.conf", "nsswitch.conf", "hostname", "passwd", "group"]).isSubset(of: listing))
        #expect(!listing.contains("shadow") && !listing.contains("sudoers"))
        if FileManager.default.fileExists(atPath: "/etc/ssl/private") {
            #expect(!FileManager.default.fileExists(atPath: etc.appendingPathComponent("ssl/private").path))
        }
        #expect(line.hasSuffix("--ro-bind /opt/apus/apus-sandbox-init /.apus-init --chdir /code -- /.apus-init --drop-caps --gid 400007 --uid 400007 --seccomp -- /usr/bin/python3 /apus/bootstrap.py"))
    }

    @Test func withoutCgroupsMemoryFallsBackToTheAddressSpaceLimit() throws {
        let sandbox = Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: "/usr/bin/prlimit")
        let argv = try sandbox.wrap(command: ["./server"], codeDirectory: URL(fileURLWithPath: "/c"), runtimeDirectory: nil,
                                    limits: ResourceLimits(memoryBytes: 1 << 28, cpuMillis: 1000, pids: 512))
        #expect(argv == ["/usr/bin/prlimit", "--nofile=1024", "--as=268435456", "--", "./server"])
        #expect(!sandbox.layers.complete)
    }
}

@Suite("instance networks")
struct InstanceNetworkTests {
    @Test(arguments: ["10.213.0.0/16", "10.0.0.0/8", "192.168.16.0/20", "172.16.0.0/12"])
    func rangesOfAtLeastOneBlock(text: String) {
        #expect(InstanceNetworks.parseRange(text) != nil)
    }

    @Test(arguments: ["10.213.0.0/21", "10.213.0.0/7", "10.213.0.1/16", "10.213.0.0", "10.213.0.0/x", "300.0.0.0/16", "10.213.0.0/16/1"])
    func badRangesAreRefused(text: String) {
        #expect(InstanceNetworks.parseRange(text) == nil)
    }

    func sandbox() throws -> Sandbox {
        let state = FileManager.default.temporaryDirectory.appendingPathComponent("sandbox-\(UUID().uuidString)")
        let identities = SandboxIdentities(range: 400_000...400_100, directory: state.appendingPathComponent("users"))
        return Sandbox(mode: .bubblewrap, bwrapPath: "/usr/bin/bwrap", prlimitPath: "/usr/bin/prlimit",
                       initPath: "/opt/apus/apus-sandbox-init", identities: identities,
                       etcDirectory: try Sandbox.writeMinimalEtc(into: state.appendingPathComponent("etc")))
    }

    let network = InstanceNetworks.Network(index: 5, name: "apus-0-5", hostInterface: "apv0x5", gateway: 0x0AD5_0015, address: 0x0AD5_0016)

    @Test func theNamespaceIsJoinedOutsideAndTheRouteAddedInsideBeforeThePrivilegeDrop() throws {
        let sandbox = try sandbox()
        let limits = ResourceLimits(memoryBytes: 1 << 27, cpuMillis: 500, pids: 64)
        let argv = try sandbox.wrap(command: ["/code/server"], codeDirectory: URL(fileURLWithPath: "/data/code/x"), runtimeDirectory: nil,
                                    limits: limits, uid: 400_003, network: network, egress: .all)
        let line = argv.joined(separator: " ")
        #expect(line.hasPrefix("/usr/bin/prlimit --nofile=1024 --as=134217728 -- /opt/apus/apus-sandbox-init --netns /run/netns/apus-0-5 -- /usr/bin/bwrap "))
        #expect(!line.contains("--unshare-net"), "the namespace is apusd's, joined before bubblewrap")
        #expect(line.hasSuffix("-- /.apus-init --default-route 10.213.0.21 --drop-caps --gid 400003 --uid 400003 --seccomp -- /code/server"))
    }

    @Test func aSlotMadeAheadWaitsInsideItsSandboxForTheSameInnerCommand() throws {
        let sandbox = try sandbox()
        let code = URL(fileURLWithPath: "/data/prewarm/sandbox-slot-1")
        let waiting = try sandbox.waitingInside(codeDirectory: code, runtimeDirectory: URL(fileURLWithPath: "/rt"),
                                                tmpBytes: 1 << 34, uid: 400_004).joined(separator: " ")
        // bubblewrap with the slot's own code folder, uid (its /etc) and the runtime files, around a waiting init:
        // no route, no privilege drop and no filter yet, and no command.
        #expect(waiting.hasPrefix("/usr/bin/bwrap --die-with-parent --new-session"))
        #expect(waiting.contains("--ro-bind /data/prewarm/sandbox-slot-1 /code --ro-bind /rt /apus"))
        #expect(waiting.contains("/users/400004/passwd /etc/passwd"))
        #expect(waiting.hasSuffix("--ro-bind /opt/apus/apus-sandbox-init /.apus-init --chdir /code -- /.apus-init --wait"))
        // What it is handed is exactly the tail of a sandbox made on demand for the same instance.
        let inner = sandbox.innerCommand(command: ["/code/server"], uid: 400_004, defaultRoute: network.gateway)
        let onDemand = try sandbox.wrap(command: ["/code/server"], codeDirectory: code, runtimeDirectory: nil,
                                        limits: ResourceLimits(memoryBytes: 1 << 27, cpuMillis: 500, pids: 64), uid: 400_004,
                                        network: network, egress: .all)
        #expect(Array(onDemand.suffix(inner.count)) == inner)
        #expect(inner.joined(separator: " ") == "/.apus-init --default-route 10.213.0.21 --drop-caps --gid 400004 --uid 400004 --seccomp -- /code/server")
        // Without bubblewrap there is nothing to make ahead.
        let plain = Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: "/usr/bin/prlimit")
        #expect(throws: ApusError.self) { try plain.waitingInside(codeDirectory: code, runtimeDirectory: nil, tmpBytes: 1, uid: 400_004) }
    }

    @Test(arguments: [FunctionManifest.Egress.mesh, .none])
    func withoutEgressThereIsNoDefaultRoute(egress: FunctionManifest.Egress) throws {
        let argv = try sandbox().wrap(command: ["/code/server"], codeDirectory: URL(fileURLWithPath: "/data/code/x"), runtimeDirectory: nil,
                                      limits: ResourceLimits(memoryBytes: 1 << 27, cpuMillis: 500, pids: 64), uid: 400_003,
                                      network: network, egress: egress)
        let line = argv.joined(separator: " ")
        #expect(line.contains("--netns /run/netns/apus-0-5"))
        #expect(!line.contains("--default-route"))
    }

    @Test func anUnprivilegedApusdJoinsTheHoldersUserNamespaceBeforeItsNetwork() throws {
        var held = network
        held.holder = 4242
        let argv = try sandbox().wrap(command: ["/code/server"], codeDirectory: URL(fileURLWithPath: "/data/code/x"), runtimeDirectory: nil,
                                      limits: ResourceLimits(memoryBytes: 1 << 27, cpuMillis: 500, pids: 64), uid: 400_003,
                                      network: held, egress: .all)
        let line = argv.joined(separator: " ")
        #expect(line.contains("/opt/apus/apus-sandbox-init --userns /proc/4242/ns/user --netns /proc/4242/ns/net -- /usr/bin/bwrap "))
        // Inside, the same privilege drop as under a root apusd (to a uid the user namespace maps).
        #expect(line.hasSuffix("-- /.apus-init --default-route 10.213.0.21 --drop-caps --gid 400003 --uid 400003 --seccomp -- /code/server"))
    }

    @Test func aSlotWaitsInsideItsNamespace() throws {
        let outer = try sandbox().outerArguments(limits: ResourceLimits(memoryBytes: 1 << 27, cpuMillis: 500, pids: 64), cgroup: nil, network: network)
        #expect(outer == ["/usr/bin/prlimit", "--nofile=1024", "--as=134217728", "--", "/opt/apus/apus-sandbox-init", "--netns", "/run/netns/apus-0-5"])
    }
}

@Suite("subordinate ids")
struct SubordinateIDsTests {
    @Test func rangesAreFoundByNameOrUid() {
        let text = "other:100000:65536\napus:200000:65536\n999:300000:16\napus:bad:1\napus:400000:0\n"
        #expect(SubordinateIDs.parse(text, user: "apus", id: 999) == [200_000...265_535, 300_000...300_015])
        #expect(SubordinateIDs.parse(text, user: nil, id: 999) == [300_000...300_015])
        #expect(SubordinateIDs.parse(text, user: "nobody", id: 1).isEmpty)
    }

    @Test func theRangeMustBeInBothFiles() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("subid-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let uid = getuid()
        let subuid = folder.appendingPathComponent("subuid"), subgid = folder.appendingPathComponent("subgid")
        try Data("\(uid):300000:1000\n".utf8).write(to: subuid)
        try Data("\(uid):300500:1000\n".utf8).write(to: subgid)
        guard Sandbox.findExecutable("newuidmap") != nil, Sandbox.findExecutable("newgidmap") != nil else { return }
        let ids = try SubordinateIDs.detect(subuid: subuid.path, subgid: subgid.path).get()
        #expect(ids.range == 300_500...300_999)
        // --sandbox-uids inside the shared range is used as it is.
        let preferred = try SubordinateIDs.detect(preferred: 300_600...300_700, subuid: subuid.path, subgid: subgid.path).get()
        #expect(preferred.range == 300_600...300_700)
        try Data("\(uid):400000:1000\n".utf8).write(to: subgid)
        guard case .failure(let error) = SubordinateIDs.detect(subuid: subuid.path, subgid: subgid.path) else {
            Issue.record("disjoint subordinate uid and gid ranges were accepted")
            return
        }
        #expect(error.message.contains("no subordinate uid and gid range"))
    }
}
