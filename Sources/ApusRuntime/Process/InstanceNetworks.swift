#if canImport(Glibc)
import Glibc
#endif
import ApusCore
import CApusShims
import Foundation
import Logging
import Synchronization

/// A network namespace per instance. Each namespace has one link to apusd: a veth pair with a /30 of its own
/// (apusd's end `.1`, the instance's `.2`) and nothing else; inside, connections to the instance's address are
/// redirected to its loopback, so a server bound to 127.0.0.1 or to 0.0.0.0 is reached alike.
///
/// What an instance reaches is decided in two places:
/// * **Its routes.** A namespace starts with no default route: it reaches its own link and nothing beyond.
///   `egress: all` instances get a default route via apusd's end, added by `apus-sandbox-init --default-route`
///   before the function's code runs (with no capability left afterwards, the function cannot add one itself).
/// * **apusd's nftables table** (`inet apus_b<block>`): from an instance link, the node itself accepts only replies
///   to apusd's own connections and the instance's sidecar (`sidecarPort` on the instance's own link address); it
///   forwards only to the outside world — never to loopback, link-local (cloud metadata), multicast, or any
///   instance's range — and masquerades what it forwards. Nothing is forwarded into an instance link unless it
///   answers the instance's own connection.
///
/// An unprivileged apusd (`UserNamespaces`) cannot make or join a namespace the host's root owns. Each namespace is
/// then held by an `apus-sandbox-init --hold` process: a user namespace (its uid 0 is apusd's uid, the instance uids
/// of `SubordinateIDs` map onto themselves) owning a network namespace. apusd links it to the host with the
/// capability it was granted alone (`CAP_NET_ADMIN`: the veth pair, its nftables table, forwarding), and configures
/// the inside as root of that user namespace. Instances join both (`apus-sandbox-init --userns --netns`), so
/// bubblewrap and the privilege drop run as root of the instance's own user namespace, never of the host.
///
/// Each apusd claims a block of 1024 links (a /20) of `--instance-network` (default 10.213.0.0/16) with a lock in
/// `/run/apus`, so several apusd on one host never share addresses; a block left behind by a killed apusd is cleaned
/// when it is claimed again. Namespaces are created ahead of need (`readyTarget` kept waiting) off the request path
/// and destroyed when their instance ends.
public final class InstanceNetworks: Sendable {
    /// One instance's namespace and link.
    public struct Network: Sendable, Hashable {
        let index: Int
        /// The namespace's name (`ip netns`): `apus-<block>-<index>`.
        public let name: String
        /// apusd's end of the veth pair.
        public let hostInterface: String
        /// apusd's end of the link (the instance's gateway and where its sidecar listens).
        public let gateway: UInt32
        /// The instance's address.
        public let address: UInt32

        /// The `apus-sandbox-init --hold` process keeping the namespaces of an unprivileged apusd; nil for a root
        /// apusd's named namespace.
        public var holder: Int32? = nil

        /// The namespace file `apus-sandbox-init --netns` joins.
        public var path: String { holder.map { "/proc/\($0)/ns/net" } ?? "/run/netns/\(name)" }
        /// The user namespace owning it, joined first (`apus-sandbox-init --userns`); nil for a root apusd.
        public var userNamespacePath: String? { holder.map { "/proc/\($0)/ns/user" } }
    }

    /// What an unprivileged apusd makes its namespaces with: `apus-sandbox-init` (the holders) and the
    /// subordinate ids each holder's user namespace maps.
    public struct UserNamespaces: Sendable {
        public let initPath: String
        public let ids: SubordinateIDs

        public init(initPath: String, ids: SubordinateIDs) {
            self.initPath = initPath
            self.ids = ids
        }
    }

    /// The port the instance's sidecar listens on at its link's gateway address (`APUS_SIDECAR`).
    public static let sidecarPort = 15001
    /// The port of apusd's instance API (task progress) at `servicesAddress`.
    public static let servicesPort = 15002
    public static let defaultRange = "10.213.0.0/16"
    /// Links per apusd (a /20 of /30s).
    static let linksPerBlock = 1024

    let block: Int
    /// The whole `--instance-network` range (every apusd's instances), refused as a destination from any instance.
    let range: (base: UInt32, prefix: Int)
    let blockBase: UInt32
    /// Where apusd's instance API listens (`servicesPort`): the block's first address, on the host's loopback
    /// device, routed to from every namespace of the block whatever its egress. Besides its own sidecar, the one
    /// place of the node an instance reaches.
    public var servicesAddress: UInt32 { blockBase + 1 }
    /// The nftables table of this apusd's block.
    let table: String
    let interfacePrefix: String
    let ipPath: String
    let nftPath: String
    let readyTarget: Int
    /// nil: apusd is root and names its namespaces (`ip netns`); otherwise it holds them in user namespaces.
    let userNamespaces: UserNamespaces?
    /// The write end of each holder's standard input by holder pid (closed: the holder exits).
    private let holders = Mutex<[Int32: Int32]>([:])
    private let lockFD: Int32
    private let logger: Logger

    private struct State {
        var free: [Int]
        var ready: [Network] = []
        var creating = 0
        var inUse: Set<Int> = []
        var closed = false
    }
    private let state: Mutex<State>

    /// This apusd's block, as `--check` and the start-up log show it.
    public var name: String { "block \(block) of \(InstanceEndpoint.format(range.base))/\(range.prefix) (\(InstanceEndpoint.format(blockBase))/20)" }

    private init(block: Int, range: (UInt32, Int), ipPath: String, nftPath: String, readyTarget: Int, userNamespaces: UserNamespaces?,
                 lockFD: Int32, logger: Logger) {
        self.block = block
        self.range = range
        self.blockBase = range.0 + UInt32(block * Self.linksPerBlock * 4)
        self.table = "apus_b\(block)"
        self.interfacePrefix = "apv\(block)x"
        self.ipPath = ipPath
        self.nftPath = nftPath
        self.readyTarget = readyTarget
        self.userNamespaces = userNamespaces
        self.lockFD = lockFD
        self.logger = logger
        // Link 0 is not used: its first address is `servicesAddress`.
        self.state = Mutex(State(free: Array((1..<Self.linksPerBlock).reversed())))
    }

    /// Parses `a.b.c.d/prefix`: a network address with a prefix of 8 to 20 bits (at least one block of links).
    public static func parseRange(_ text: String) -> (base: UInt32, prefix: Int)? {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let address = InstanceEndpoint.parse(String(parts[0])), let prefix = Int(parts[1]),
              (8...20).contains(prefix) else { return nil }
        let mask = UInt32.max << UInt32(32 - prefix)
        guard address & mask == address else { return nil }
        return (address, prefix)
    }

    /// Sets up this apusd's part of the host: claims a block of `range`, installs its nftables table and turns on
    /// IPv4 forwarding (forwarded packets that are not an instance's are dropped when forwarding was off before).
    /// Fails with the reason when the host cannot (not root, no `ip`/`nft`, no free block). `userNamespaces`: apusd is
    /// not root; it needs `CAP_NET_ADMIN` (granted to it alone, e.g. `AmbientCapabilities=` of its systemd unit) and
    /// a writable `/run/apus` (`RuntimeDirectory=apus`) or `$RUNTIME_DIRECTORY`.
    public static func setUp(range text: String, readyTarget: Int = 2, userNamespaces: UserNamespaces? = nil,
                             logger: Logger) -> Result<InstanceNetworks, ApusError> {
        guard let range = parseRange(text) else {
            return .failure(ApusError(.badRequest, "--instance-network: must be an IPv4 network such as 10.213.0.0/16 with a prefix of 8 to 20 bits (got \(text))"))
        }
        if userNamespaces == nil {
            guard getuid() == 0 else { return .failure(ApusError(.unavailable, "apusd is not root: cannot create network namespaces")) }
        } else {
            guard hasEffectiveCapability(netAdmin) else {
                return .failure(ApusError(.unavailable, "apusd is not root and lacks CAP_NET_ADMIN: cannot link instance namespaces to the host (grant it with AmbientCapabilities=CAP_NET_ADMIN, see Deploy/systemd)"))
            }
        }
        guard let ip = Sandbox.findExecutable("ip") else { return .failure(ApusError(.unavailable, "ip (iproute2) not found")) }
        guard let nft = Sandbox.findExecutable("nft") else { return .failure(ApusError(.unavailable, "nft (nftables) not found")) }
        var runDirectory = "/run/apus"
        mkdir(runDirectory, 0o700)
        if userNamespaces != nil, access(runDirectory, W_OK | X_OK) != 0 {
            guard let fallback = ProcessInfo.processInfo.environment["RUNTIME_DIRECTORY"], access(fallback, W_OK | X_OK) == 0 else {
                return .failure(ApusError(.unavailable, "/run/apus is not writable by apusd's user (give it RuntimeDirectory=apus, see Deploy/systemd): it holds the locks of the instance network blocks"))
            }
            runDirectory = fallback
        }
        let blocks = 1 << (20 - range.prefix)
        for block in 0..<blocks {
            let lockPath = "\(runDirectory)/netblock-\(InstanceEndpoint.format(range.base))-\(range.prefix)-\(block).lock"
            let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            // A lock file of another user's apusd (a root one): that block is not ours to take.
            if fd < 0, errno == EACCES, userNamespaces != nil { continue }
            guard fd >= 0 else { return .failure(ApusError(.unavailable, "cannot open \(lockPath): \(String(cString: strerror(errno)))")) }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
                close(fd)
                continue
            }
            let networks = InstanceNetworks(block: block, range: range, ipPath: ip, nftPath: nft, readyTarget: readyTarget,
                                            userNamespaces: userNamespaces, lockFD: fd, logger: logger)
            do throws(ApusError) {
                try networks.removeLeftovers()
                try networks.enableForwarding(runDirectory: runDirectory)
                try networks.installTable()
                try networks.run([ip, "addr", "add", "\(InstanceEndpoint.format(networks.servicesAddress))/32", "dev", "lo"])
            } catch {
                networks.releaseLock()
                return .failure(error)
            }
            return .success(networks)
        }
        return .failure(ApusError(.unavailable, "every block of \(text) is held by another apusd (\(blocks) of \(linksPerBlock) instances each)"))
    }

    static let netAdmin = 12

    /// Whether this process holds `capability` (a bit of CapEff in /proc/self/status).
    static func hasEffectiveCapability(_ capability: Int) -> Bool {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return false }
        for line in status.split(separator: "\n") where line.hasPrefix("CapEff:") {
            guard let mask = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16) else { return false }
            return mask & (1 << UInt64(capability)) != 0
        }
        return false
    }

    /// How namespaces are made and linked, for the start-up log and `apusd --check`.
    public var privilegeDescription: String {
        userNamespaces == nil
            ? "named network namespaces made as root (ip netns)"
            : "network namespaces owned by each instance's user namespace (apus-sandbox-init --hold); host links, nftables and forwarding with CAP_NET_ADMIN held by apusd"
    }

    // MARK: links

    func network(index: Int) -> Network {
        let base = blockBase + UInt32(index * 4)
        return Network(index: index, name: "apus-\(block)-\(index)", hostInterface: "\(interfacePrefix)\(index)",
                       gateway: base + 1, address: base + 2)
    }

    /// A namespace for a process about to start: a waiting one, or one made now (tens of milliseconds) when none
    /// is waiting. Give it back with `release(_:)` once the process has ended.
    public func take() throws(ApusError) -> Network {
        let waiting = state.withLock { state -> Network? in
            guard !state.ready.isEmpty else { return nil }
            let network = state.ready.removeLast()
            state.inUse.insert(network.index)
            return network
        }
        defer { replenishInBackground() }
        if let waiting { return waiting }
        let index = try claimIndex()
        do throws(ApusError) {
            return try create(network(index: index))
        } catch {
            state.withLock { state in
                state.inUse.remove(index)
                state.free.append(index)
            }
            throw error
        }
    }

    private func claimIndex() throws(ApusError) -> Int {
        let index = state.withLock { state -> Int? in
            guard !state.closed, let index = state.free.popLast() else { return nil }
            state.inUse.insert(index)
            return index
        }
        guard let index else {
            throw ApusError(.unavailable, "no instance network left: \(Self.linksPerBlock) instances run on this node already")
        }
        return index
    }

    /// The process using `network` has ended: the namespace is destroyed (with everything its instance left in
    /// it) and its addresses are free again.
    public func release(_ network: Network) {
        Thread.detachNewThread { [self] in
            destroy(network)
            let closed = state.withLock { state -> Bool in
                state.inUse.remove(network.index)
                state.free.insert(network.index, at: 0)  // reused last: late packets of the old instance find nothing
                return state.closed
            }
            if !closed { replenish() }
        }
    }

    private func replenishInBackground() {
        Thread.detachNewThread { [self] in replenish() }
    }

    /// Creates namespaces until `readyTarget` wait or are being created.
    func replenish() {
        while true {
            let index = state.withLock { state -> Int? in
                guard !state.closed, state.ready.count + state.creating < readyTarget, let index = state.free.popLast() else { return nil }
                state.creating += 1
                return index
            }
            guard let index else { return }
            var made = network(index: index)
            var ok = true
            do throws(ApusError) {
                made = try create(made)
            } catch {
                ok = false
                logger.warning("cannot create an instance network namespace", metadata: ["namespace": "\(made.name)", "reason": "\(error.message)"])
            }
            let surplus = state.withLock { state -> Bool in
                state.creating -= 1
                if ok, !state.closed {
                    state.ready.append(made)
                    return false
                }
                state.free.append(index)
                return ok
            }
            if surplus { destroy(made) }
            if !ok { return }
        }
    }

    /// Destroys the waiting namespaces and the table, and gives the block back; namespaces still in use are
    /// destroyed as their processes end (`release`), or by the next apusd that claims the block.
    public func shutdown() {
        let ready = state.withLock { state -> [Network] in
            state.closed = true
            defer { state.ready.removeAll() }
            return state.ready
        }
        for network in ready { destroy(network) }
    }

    /// Removes the table and every namespace of the block (at exit, after the instances stopped).
    public func tearDown() {
        shutdown()
        let inUse = state.withLock { $0.inUse }
        for index in inUse { destroy(network(index: index)) }
        let remaining = holders.withLock { holders in
            defer { holders.removeAll() }
            return holders
        }
        for (holder, stdin) in remaining {
            close(stdin)
            kill(holder, SIGKILL)
            var status: Int32 = 0
            while waitpid(holder, &status, 0) == -1, errno == EINTR {}
        }
        _ = try? run([nftPath, "delete", "table", "inet", table])
        _ = try? run([ipPath, "addr", "delete", "\(InstanceEndpoint.format(servicesAddress))/32", "dev", "lo"])
        releaseLock()
    }

    private func releaseLock() {
        flock(lockFD, LOCK_UN)
        close(lockFD)
    }

    private func create(_ network: Network) throws(ApusError) -> Network {
        if let userNamespaces { return try createHeld(network, userNamespaces) }
        let gateway = InstanceEndpoint.format(network.gateway)
        let address = InstanceEndpoint.format(network.address)
        let name = network.name
        let link = network.hostInterface
        // Inside: IPv6 off on the link (loopback keeps ::1), connections to the instance's address go to its
        // loopback (route_localnet lets them), no default route (see `apus-sandbox-init --default-route`).
        let inner = """
            table ip apus { chain prerouting { type nat hook prerouting priority dstnat; policy accept; \
            iifname "eth0" ip daddr \(address) dnat to 127.0.0.1; }; }
            """
        let script = """
            set -e
            \(ipPath) netns add \(name)
            \(ipPath) link add \(link) type veth peer name eth0 netns \(name)
            echo 1 > /proc/sys/net/ipv6/conf/\(link)/disable_ipv6
            \(ipPath) addr add \(gateway)/30 dev \(link)
            \(ipPath) link set \(link) up
            \(ipPath) -n \(name) addr add \(address)/30 dev eth0
            \(ipPath) -n \(name) link set lo up
            \(ipPath) -n \(name) link set eth0 up
            \(ipPath) -n \(name) route add \(InstanceEndpoint.format(servicesAddress))/32 via \(gateway) dev eth0
            \(ipPath) netns exec \(name) /bin/sh -c 'echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet; exec \(nftPath) -f -' <<'RULES'
            \(inner)
            RULES
            """
        do throws(ApusError) {
            try run(["/bin/sh", "-c", script])
        } catch {
            destroy(network)
            throw ApusError(.unavailable, "cannot create network namespace \(name): \(error.message)")
        }
        return network
    }

    /// An unprivileged apusd's namespace: a holder makes a user and a network namespace, gets its uid/gid maps, a
    /// veth pair is made on the host with the peer moved into the holder's namespace, and the inside is set up by
    /// `ip`/`nft` run as root of the holder's user namespace (the same rules as `create`'s).
    private func createHeld(_ network: Network, _ userNamespaces: UserNamespaces) throws(ApusError) -> Network {
        var network = network
        let holder = try startHolder(userNamespaces.initPath)
        network.holder = holder
        let gateway = InstanceEndpoint.format(network.gateway)
        let address = InstanceEndpoint.format(network.address)
        let link = network.hostInterface
        let host = """
            set -e
            \(ipPath) link add \(link) type veth peer name eth0 netns \(holder)
            echo 1 > /proc/sys/net/ipv6/conf/\(link)/disable_ipv6
            \(ipPath) addr add \(gateway)/30 dev \(link)
            \(ipPath) link set \(link) up
            """
        let inside = """
            set -e
            \(ipPath) addr add \(address)/30 dev eth0
            \(ipPath) link set lo up
            \(ipPath) link set eth0 up
            \(ipPath) route add \(InstanceEndpoint.format(servicesAddress))/32 via \(gateway) dev eth0
            echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6
            echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet
            exec \(nftPath) -f -
            """
        let rules = """
            table ip apus { chain prerouting { type nat hook prerouting priority dstnat; policy accept; \
            iifname "eth0" ip daddr \(address) dnat to 127.0.0.1; }; }
            """
        do throws(ApusError) {
            try userNamespaces.ids.map(pid: holder)
            try run(["/bin/sh", "-c", host])
            try run([userNamespaces.initPath, "--userns", network.userNamespacePath!, "--netns", network.path, "--", "/bin/sh", "-c", inside],
                    input: rules)
        } catch {
            destroy(network)
            throw ApusError(.unavailable, "cannot create network namespace \(network.name) (holder \(holder)): \(error.message)")
        }
        return network
    }

    /// Starts `apus-sandbox-init --hold` and waits for its "ready" (its namespaces exist); returns its pid.
    private func startHolder(_ initPath: String) throws(ApusError) -> Int32 {
        let child = try ChildProcess.spawn(argv: [initPath, "--hold"], environment: [:], workingDirectory: "/", stdinPipe: true)
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 64 {
            let n = read(child.stdoutFD, &byte, 1)
            if n < 0, errno == EINTR { continue }
            if n <= 0 || byte == UInt8(ascii: "\n") { break }
            line.append(byte)
        }
        close(child.stdoutFD)
        guard String(decoding: line, as: UTF8.self) == "ready" else {
            var reason = [UInt8](repeating: 0, count: 512)
            let n = read(child.stderrFD, &reason, reason.count)
            close(child.stderrFD)
            if let stdin = child.stdinFD { close(stdin) }
            kill(child.pid, SIGKILL)
            _ = child.waitForExit()
            let text = n > 0 ? String(decoding: reason[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : "no reason given"
            throw ApusError(.unavailable, "the namespace holder did not start: \(text)")
        }
        close(child.stderrFD)
        holders.withLock { $0[child.pid] = child.stdinFD! }
        return child.pid
    }

    private func destroy(_ network: Network) {
        if let holder = network.holder {
            _ = try? run([ipPath, "link", "delete", network.hostInterface])
            if let stdin = holders.withLock({ $0.removeValue(forKey: holder) }) { close(stdin) }
            kill(holder, SIGKILL)
            var status: Int32 = 0
            while waitpid(holder, &status, 0) == -1, errno == EINTR {}
            return
        }
        _ = try? run([ipPath, "netns", "delete", network.name])
        _ = try? run([ipPath, "link", "delete", network.hostInterface])
    }

    /// Namespaces and links a killed apusd left in this block, and its table.
    private func removeLeftovers() throws(ApusError) {
        let prefix = "apus-\(block)-"
        // An unprivileged apusd's namespaces die with their holders (killed with the apusd that started them).
        let names = userNamespaces == nil ? ((try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []) : []
        for name in names where name.hasPrefix(prefix) {
            _ = try? run([ipPath, "netns", "delete", name])
        }
        let links = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? []
        for link in links where link.hasPrefix(interfacePrefix) {
            _ = try? run([ipPath, "link", "delete", link])
        }
        _ = try? run([nftPath, "delete", "table", "inet", table])
        _ = try? run([ipPath, "addr", "delete", "\(InstanceEndpoint.format(servicesAddress))/32", "dev", "lo"])
    }

    /// IPv4 forwarding on, as instances with `egress: all` need. When it was off before the first apusd turned it
    /// on (remembered in /run/apus), a table of its own drops every forwarded packet that is not an instance's, so
    /// the host does not become a router for anything else.
    private func enableForwarding(runDirectory: String) throws(ApusError) {
        let sysctl = "/proc/sys/net/ipv4/ip_forward"
        let remembered = "\(runDirectory)/ip_forward.before"
        let current = ((try? String(contentsOfFile: sysctl, encoding: .utf8)) ?? "0").trimmingCharacters(in: .whitespacesAndNewlines)
        if !FileManager.default.fileExists(atPath: remembered) {
            try? Data(current.utf8).write(to: URL(fileURLWithPath: remembered))
        }
        let before = ((try? String(contentsOfFile: remembered, encoding: .utf8)) ?? current).trimmingCharacters(in: .whitespacesAndNewlines)
        if before == "0" {
            try run([nftPath, "-f", "-"], input: """
                table inet apus_forward_guard
                flush table inet apus_forward_guard
                table inet apus_forward_guard { chain forward { type filter hook forward priority filter - 5; policy accept; \
                iifname != "apv*" oifname != "apv*" drop; }; }
                """)
        }
        if current != "1" {
            let fd = open(sysctl, O_WRONLY | O_CLOEXEC)
            guard fd >= 0, write(fd, "1\n", 2) == 2 else {
                if fd >= 0 { close(fd) }
                throw ApusError(.unavailable, "cannot turn on IPv4 forwarding (\(sysctl)): \(String(cString: strerror(errno)))")
            }
            close(fd)
        }
    }

    private func installTable() throws(ApusError) {
        let links = "\"\(interfacePrefix)*\""
        let blockNetwork = "\(InstanceEndpoint.format(blockBase))/20"
        let rangeNetwork = "\(InstanceEndpoint.format(range.base))/\(range.prefix)"
        try run([nftPath, "-f", "-"], input: """
            table inet \(table) {
              chain input {
                type filter hook input priority filter - 10; policy accept;
                iifname \(links) ct state established,related accept
                iifname \(links) meta nfproto ipv4 fib daddr . iif type local tcp dport \(Self.sidecarPort) accept
                iifname \(links) ip daddr \(InstanceEndpoint.format(servicesAddress)) tcp dport \(Self.servicesPort) accept
                iifname \(links) drop
              }
              chain forward {
                type filter hook forward priority filter - 10; policy accept;
                oifname \(links) ct state established,related accept
                oifname \(links) drop
                iifname \(links) meta nfproto != ipv4 drop
                iifname \(links) ip daddr { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3, \(rangeNetwork) } drop
                iifname \(links) ct state new,established,related accept
                iifname \(links) drop
              }
              chain postrouting {
                type nat hook postrouting priority srcnat; policy accept;
                ip saddr \(blockNetwork) oifname != \(links) masquerade
              }
            }
            """)
    }

    /// Runs a command to its end; throws with its first line of stderr when it fails.
    @discardableResult
    func run(_ argv: [String], input: String? = nil) throws(ApusError) -> String {
        // An unprivileged apusd lends the CAP_NET_ADMIN it holds to this command alone: ambient on this thread
        // while the command is started (no other thread, and no other program apusd starts, has it).
        if userNamespaces != nil, apus_ambient_capability(1, Int32(Self.netAdmin)) != 0 {
            throw ApusError(.unavailable, "cannot lend CAP_NET_ADMIN to \(argv[0]): \(String(cString: strerror(errno))) (it must be permitted and inheritable, as AmbientCapabilities= makes it)")
        }
        defer { if userNamespaces != nil { _ = apus_ambient_capability(0, Int32(Self.netAdmin)) } }
        let output = try CodeArchive.run(argv[0], Array(argv.dropFirst()), input: input.map { Data($0.utf8) }, failureCode: .unavailable)
        return String(decoding: output, as: UTF8.self)
    }
}
