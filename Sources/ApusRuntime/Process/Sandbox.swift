import Foundation
import Logging

/// Decides how instances are confined. With a working bubblewrap each instance gets its own mount view:
/// system directories and its code read-only, a private /tmp, nothing else of the host (so neither the data
/// directory nor other functions' code). Rlimits (address space, open files) apply either way.
public struct Sandbox: Sendable {
    public enum Mode: String, Sendable {
        case bubblewrap = "bwrap"
        case rlimitsOnly = "rlimits"
    }

    public let mode: Mode
    let bwrapPath: String?
    let prlimitPath: String?
    public static let openFilesLimit = 1024

    /// The mount point of the function's code inside the sandbox.
    public static let codeMount = "/code"
    /// The mount point of the bundled runtime files (bootstrap) inside the sandbox.
    public static let runtimeMount = "/apus"

    public init(mode: Mode, bwrapPath: String?, prlimitPath: String?) {
        self.mode = mode
        self.bwrapPath = bwrapPath
        self.prlimitPath = prlimitPath
    }

    /// Probes the host: uses bubblewrap when present and able to build a namespace here.
    public static func detect(disabled: Bool, logger: Logger) -> Sandbox {
        let prlimit = findExecutable("prlimit")
        if prlimit == nil {
            logger.warning("prlimit not found: instances run without memory and open-file limits")
        }
        if disabled {
            logger.warning("sandbox disabled by --no-sandbox: instances can see the whole host file system")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit)
        }
        guard let bwrap = findExecutable("bwrap") else {
            logger.warning("SANDBOX UNAVAILABLE: bwrap (bubblewrap) not installed; instances run with rlimits only and can read the host file system, including the data directory")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit)
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
            logger.warning("SANDBOX UNAVAILABLE: cannot run bwrap (\(error)); instances run with rlimits only")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit)
        }
        guard probe.terminationStatus == 0 else {
            logger.warning("SANDBOX UNAVAILABLE: bwrap cannot create namespaces on this host (exit \(probe.terminationStatus)); instances run with rlimits only")
            return Sandbox(mode: .rlimitsOnly, bwrapPath: nil, prlimitPath: prlimit)
        }
        return Sandbox(mode: .bubblewrap, bwrapPath: bwrap, prlimitPath: prlimit)
    }

    /// Read-only system directories, keeping symlinked ones (merged /usr) as symlinks.
    static func systemMountArguments() -> [String] {
        var args = ["--ro-bind", "/usr", "/usr"]
        for path in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: path) {
                args += ["--symlink", target, path]
            } else if FileManager.default.fileExists(atPath: path) {
                args += ["--ro-bind", path, path]
            }
        }
        for path in ["/etc"] where FileManager.default.fileExists(atPath: path) {
            args += ["--ro-bind", path, path]
        }
        return args
    }

    /// The argv that runs `command` confined. `command` must already use in-sandbox paths.
    func wrap(command: [String], codeDirectory: URL, runtimeDirectory: URL?, memoryLimit: Int64) -> [String] {
        var argv: [String] = []
        if let prlimitPath {
            argv += [prlimitPath, "--as=\(memoryLimit)", "--nofile=\(Self.openFilesLimit)", "--"]
        }
        switch mode {
        case .rlimitsOnly:
            argv += command
        case .bubblewrap:
            argv += [bwrapPath!, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
            argv += Self.systemMountArguments()
            argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
            argv += ["--ro-bind", codeDirectory.path, Self.codeMount]
            if let runtimeDirectory {
                argv += ["--ro-bind", runtimeDirectory.path, Self.runtimeMount]
            }
            argv += ["--chdir", Self.codeMount, "--"]
            argv += command
        }
        return argv
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
