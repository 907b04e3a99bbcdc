#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore
import CApusShims
import Foundation

/// A child process spawned in its own process group with stdout/stderr on pipes and default signal dispositions
/// (the daemon ignores SIGTERM/SIGPIPE itself; instances must not inherit that).
struct ChildProcess: Sendable {
    let pid: pid_t
    let stdoutFD: Int32
    let stderrFD: Int32
    /// The write end of the child's stdin when spawned with `stdinPipe: true` (prewarmed processes read their
    /// function there); nil when stdin is /dev/null.
    let stdinFD: Int32?

    static func spawn(argv: [String], environment: [String: String], workingDirectory: String, stdinPipe: Bool = false) throws(ApusError) -> ChildProcess {
        precondition(!argv.isEmpty)
        var outPipe: [Int32] = [0, 0]
        var errPipe: [Int32] = [0, 0]
        var inPipe: [Int32] = [-1, -1]
        guard apus_pipe_cloexec(&outPipe) == 0, apus_pipe_cloexec(&errPipe) == 0, !stdinPipe || apus_pipe_cloexec(&inPipe) == 0 else {
            throw ApusError(.internal, "pipe2 failed: \(String(cString: strerror(errno)))")
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if stdinPipe {
            posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        apus_spawn_file_actions_addchdir(&actions, workingDirectory)
        // Only 0, 1 and 2 go to the child: a descriptor opened meanwhile by another thread without FD_CLOEXEC (a
        // Foundation `Process` pipe, say) would otherwise live on in a long-lived instance and keep its reader
        // from ever seeing end-of-file.
        apus_spawn_file_actions_addclosefrom(&actions, 3)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        posix_spawnattr_setpgroup(&attributes, 0)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2, SIGALRM] {
            sigaddset(&defaults, signal)
        }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var emptyMask = sigset_t()
        sigemptyset(&emptyMask)
        posix_spawnattr_setsigmask(&attributes, &emptyMask)

        let envList = environment.map { "\($0.key)=\($0.value)" }
        var pid: pid_t = 0
        let result = withCStrings(argv) { cArgv in
            withCStrings(envList) { cEnv in
                posix_spawn(&pid, argv[0], &actions, &attributes, cArgv, cEnv)
            }
        }
        close(outPipe[1])
        close(errPipe[1])
        if stdinPipe { close(inPipe[0]) }
        guard result == 0 else {
            close(outPipe[0])
            close(errPipe[0])
            if stdinPipe { close(inPipe[1]) }
            throw ApusError(.unavailable, "cannot start \(argv[0]): \(String(cString: strerror(result)))")
        }
        return ChildProcess(pid: pid, stdoutFD: outPipe[0], stderrFD: errPipe[0], stdinFD: stdinPipe ? inPipe[1] : nil)
    }

    /// Signals the whole process group (the instance and anything it started).
    func signalGroup(_ signal: Int32) {
        _ = kill(-pid, signal)
    }

    /// The process that runs the function itself. Under bubblewrap the spawned pid is bwrap, which must not get
    /// SIGTERM (it would die at once and take the instance down with SIGKILL before it drains): walk down the
    /// process tree past every bwrap to the first process that is not one.
    func functionProcess() -> pid_t {
        var current = pid
        for _ in 0..<8 {
            guard commandName(of: current) == "bwrap" else { return current }
            guard let child = firstChild(of: current) else { return current }
            current = child
        }
        return current
    }

    private func commandName(of pid: pid_t) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8) else { return nil }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private func firstChild(of pid: pid_t) -> pid_t? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8) else { return nil }
        return text.split(separator: " ").compactMap { pid_t($0) }.first
    }

    /// Blocks the calling thread until the child ends.
    func waitForExit() -> InstanceExit {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 {
            if errno != EINTR { return InstanceExit(status: nil, signal: nil) }
        }
        // WIFEXITED / WTERMSIG are macros; decode by hand.
        let termSignal = status & 0x7f
        if termSignal == 0 {
            return InstanceExit(status: (status >> 8) & 0xff, signal: nil)
        }
        return InstanceExit(status: nil, signal: termSignal)
    }
}

private func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}

/// Finds a free loopback TCP port by binding port 0 and releasing it.
enum FreePort {
    static func pick() throws(ApusError) -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ApusError(.internal, "socket failed") }
        defer { close(fd) }
        var address = loopbackAddress(port: 0)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else { throw ApusError(.internal, "bind failed: \(String(cString: strerror(errno)))") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

/// `127.0.0.1:port` as a socket address.
func loopbackAddress(port: Int) -> sockaddr_in {
    socketAddress(.loopback(port: port))
}

/// An instance endpoint as a socket address.
func socketAddress(_ endpoint: InstanceEndpoint) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = UInt16(endpoint.port).bigEndian
    address.sin_addr.s_addr = endpoint.address.bigEndian
    return address
}
