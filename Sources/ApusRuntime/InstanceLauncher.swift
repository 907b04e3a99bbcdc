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

    public init(status: Int32?, signal: Int32?) {
        self.status = status
        self.signal = signal
    }

    public var description: String {
        if let signal { return "killed by signal \(signal)" }
        return "exited with status \(status ?? -1)"
    }
}

/// A started, ready instance.
public protocol InstanceHandle: Sendable {
    var instanceID: String { get }
    /// Loopback port the instance serves on.
    var port: Int { get }
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
}

extension InstanceLauncher {
    public func shutdown() async {}
}
