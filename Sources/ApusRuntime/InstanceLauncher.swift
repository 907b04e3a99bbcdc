import ApusCore
import Foundation

/// Everything needed to start one instance of one function version.
public struct InstanceSpec: Sendable {
    public var instanceID: String
    public var version: FunctionVersion
    /// Unpacked code of the version.
    public var codeDirectory: URL

    public init(instanceID: String, version: FunctionVersion, codeDirectory: URL) {
        self.instanceID = instanceID
        self.version = version
        self.codeDirectory = codeDirectory
    }

    public var manifest: FunctionManifest { version.manifest }
}

/// How an instance ended.
public struct InstanceExit: Sendable, CustomStringConvertible {
    public var status: Int32?
    public var signal: Int32?
    /// Set when the kernel's OOM killer ended the instance: the memory limit it hit.
    public var outOfMemoryLimit: Int64?

    public init(status: Int32?, signal: Int32?, outOfMemoryLimit: Int64? = nil) {
        self.status = status
        self.signal = signal
        self.outOfMemoryLimit = outOfMemoryLimit
    }

    public var description: String {
        if let outOfMemoryLimit { return "killed: out of memory (limit \(ByteSize.format(outOfMemoryLimit)))" }
        if let signal { return "killed by signal \(signal)" }
        return "exited with status \(status ?? -1)"
    }
}

/// A started, ready instance.
public protocol InstanceHandle: Sendable {
    var instanceID: String { get }
    /// The port the instance serves on (`endpoint.port`).
    var port: Int { get }
    /// Where the instance serves: loopback, or its address in its own network namespace.
    var endpoint: InstanceEndpoint { get }
    var pid: Int32 { get }
    /// SIGTERM, then SIGKILL after `grace`; returns once the instance is gone.
    func stop(grace: Duration) async
}

/// Starts instances. `launch` returns once the instance is ready, or throws why it never became ready.
/// `onExit` fires once when the instance ends, whether asked to or not (not if `launch` throws).
public protocol InstanceLauncher: Sendable {
    func launch(_ spec: InstanceSpec, onExit: @escaping @Sendable (InstanceExit) -> Void) async throws(ApusError) -> any InstanceHandle
    /// Releases what the launcher keeps besides instances (prewarmed processes); called once all instances stopped.
    func shutdown() async
    /// Why an instance failed its callers, when the launcher knows more than a closed connection tells (the OOM
    /// killer ended it: "killed: out of memory (limit 256Mi)"); nil when nothing is known.
    func failureReason(instanceID: String) -> String?
    /// Whether the instance's process still runs (its exit has not been seen). An instance that closed a
    /// connection before answering while it still runs may be dying: its exit, moments later, tells why.
    func isRunning(instanceID: String) -> Bool
}

extension InstanceHandle {
    public var endpoint: InstanceEndpoint { .loopback(port: port) }
}

extension InstanceLauncher {
    public func shutdown() async {}
    public func failureReason(instanceID: String) -> String? { nil }
    public func isRunning(instanceID: String) -> Bool { false }
}
