import ApusMesh
import ApusWire
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// Which side of the sidecar a listener serves.
public enum ProxySide: Sendable {
    /// The app's calls out to named upstreams.
    case outbound
    /// Mesh traffic in to the app.
    case inbound
}

/// Per-event-loop connection pools (used only on their loop).
final class LoopResources: @unchecked Sendable {
    let http1: HTTP1UpstreamPool
    let http2: HTTP2UpstreamPool
    let thrift: ThriftUpstreamPool
    /// Trace and request ids for the streams of this loop (seeded once, not per stream).
    var ids = IDGenerator()

    init(eventLoop: any EventLoop) {
        http1 = HTTP1UpstreamPool(eventLoop: eventLoop)
        http2 = HTTP2UpstreamPool(eventLoop: eventLoop)
        thrift = ThriftUpstreamPool(eventLoop: eventLoop)
    }
}

/// What every connection handler of the sidecar shares: the upstream directory, the inbound app target and
/// limits, the live configuration, per-loop pools, and drain accounting.
public final class SidecarShared: Sendable {
    public let directory: UpstreamDirectory
    /// The app behind the inbound listener, as a one-endpoint upstream (no breaker, no ejection).
    public let app: UpstreamCluster?
    let limits: InboundLimits
    let logger: Logger
    private let loops: [ObjectIdentifier: LoopResources]
    private let live: Mutex<SidecarConfig>
    /// The service this sidecar fronts: sent as `x-apus-caller` on outbound calls.
    let callerName: String?
    /// Requests being served (both sides), for draining.
    let inFlight = Atomic<Int>(0)
    let draining = Atomic<Bool>(false)
    private let connections = Mutex<[ObjectIdentifier: any DrainableConnection & Sendable]>([:])

    public init(directory: UpstreamDirectory, config: SidecarConfig, eventLoops: [any EventLoop], logger: Logger) {
        self.directory = directory
        self.logger = logger
        self.live = Mutex(config)
        self.callerName = config.service
        var loops: [ObjectIdentifier: LoopResources] = [:]
        for loop in eventLoops { loops[ObjectIdentifier(loop)] = LoopResources(eventLoop: loop) }
        self.loops = loops
        self.limits = InboundLimits(config: config.inbound)
        if let appPort = config.appPort {
            var policy = UpstreamPolicy()
            policy.attempts = 1
            policy.timeout = config.inbound.timeout
            policy.maxRequests = Int.max
            policy.breaker.consecutiveFailures = Int.max
            policy.outlier.consecutiveFailures = Int.max
            let app = UpstreamCluster(name: "app", policy: policy, metricsPrefix: "apus_sidecar_inbound", logger: logger)
            app.update(endpoints: [ServiceEndpoint(id: "app", address: config.appAddress, port: appPort, protocol: config.appProtocol)])
            self.app = app
        } else {
            self.app = nil
        }
    }

    public var config: SidecarConfig { live.withLock { $0 } }

    /// Applies a reloaded configuration: policies and limits change, listeners and connections stay.
    public func reload(_ config: SidecarConfig) {
        live.withLock { $0 = config }
        directory.reload(config)
        limits.update(config.inbound)
        if let app {
            var policy = app.policy
            policy.timeout = config.inbound.timeout
            app.update(policy: policy)
        }
    }

    func resources(for loop: any EventLoop) -> LoopResources {
        loops[ObjectIdentifier(loop)]!
    }

    func register(_ connection: any DrainableConnection & Sendable) {
        connections.withLock { $0[ObjectIdentifier(connection)] = connection }
    }

    func unregister(_ connection: AnyObject) {
        _ = connections.withLock { $0.removeValue(forKey: ObjectIdentifier(connection)) }
    }

    /// Stops taking new work on open connections: idle ones close, busy ones after their current requests.
    public func beginDrain() {
        draining.store(true, ordering: .relaxed)
        let all = connections.withLock { Array($0.values) }
        for connection in all { connection.beginDrain() }
    }

    public var requestsInFlight: Int { inFlight.load(ordering: .relaxed) }
}

/// A connection that can be told to finish its work and close.
protocol DrainableConnection: AnyObject {
    func beginDrain()
}

/// Ids and trace context made up by the sidecar.
struct IDGenerator {
    private var random: XorShiftRandom

    init() {
        random = XorShiftRandom(seed: UInt64.random(in: 1...UInt64.max))
    }

    static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    private mutating func writeHex(_ value: UInt64, to out: inout ByteBuffer) {
        out.reserveCapacity(minimumWritableBytes: 16)
        var shift: UInt64 = 60
        for _ in 0..<16 {
            out.writeInteger(Self.hex[Int((value >> shift) & 0xF)])
            shift &-= 4
        }
    }

    /// A W3C `traceparent` value: version 00, random trace and span ids, sampled.
    mutating func writeTraceparent(to out: inout ByteBuffer) {
        out.writeStatic("00-")
        writeHex(random.next() | 1, to: &out)
        writeHex(random.next(), to: &out)
        out.writeStatic("-")
        writeHex(random.next() | 1, to: &out)
        out.writeStatic("-01")
    }

    mutating func traceparent() -> String {
        var buffer = ByteBuffer()
        writeTraceparent(to: &buffer)
        return String(buffer: buffer)
    }

    mutating func requestID() -> String {
        var buffer = ByteBuffer()
        writeHex(random.next(), to: &buffer)
        return String(buffer: buffer)
    }
}

enum EpochClock {
    static func nowMs() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
    }
}

/// HTTP reason phrases for the statuses the sidecar writes itself.
func reasonPhrase(_ status: Int) -> String {
    switch status {
    case 400: "Bad Request"
    case 404: "Not Found"
    case 429: "Too Many Requests"
    case 431: "Request Header Fields Too Large"
    case 500: "Internal Server Error"
    case 501: "Not Implemented"
    case 502: "Bad Gateway"
    case 503: "Service Unavailable"
    case 504: "Gateway Timeout"
    case 505: "HTTP Version Not Supported"
    default: "Error"
    }
}

/// JSON error bodies: `{"error": "...", "upstream": "..."}`.
func errorBody(_ message: String, upstream: String?) -> String {
    func escape(_ s: String) -> String {
        var out = ""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: if scalar.value < 0x20 { out += " " } else { out.unicodeScalars.append(scalar) }
            }
        }
        return out
    }
    if let upstream { return "{\"error\":\"\(escape(message))\",\"upstream\":\"\(escape(upstream))\"}\n" }
    return "{\"error\":\"\(escape(message))\"}\n"
}

/// A short reason for a failed connect ("connection refused", "connect timeout") instead of NIO's nested dump.
func describeConnectError(_ error: any Error) -> String {
    if let connection = error as? NIOConnectionError, let first = connection.connectionErrors.first {
        return describeConnectError(first.error)
    }
    if let io = error as? IOError {
        return String(cString: strerror(io.errnoCode)).lowercased()
    }
    if case ChannelError.connectTimeout = error { return "connect timeout" }
    return "\(error)"
}
