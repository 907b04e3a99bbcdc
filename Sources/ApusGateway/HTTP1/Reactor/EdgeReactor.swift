import ApusCore
import CApusShims
import Foundation
import Glibc
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// The plaintext HTTP port: its listening socket and the common case of HTTP/1.1 on it, served by reactor
/// threads of our own (edge-triggered epoll, one loop per thread) instead of SwiftNIO's channel pipeline.
///
/// A reactor thread serves a request itself when it can start it on the spot: a complete head, a body that is
/// absent or framed by `Content-Length`, an HTTP function, a free slot right now. It relays the request and the
/// response between the client and a pooled keep-alive connection to the instance, with the same bytes the
/// NIO handler (`GatewayConnectionHandler`) would send, the same error responses once a request is under way
/// (502, 504), the same metrics and the same backpressure in both directions.
///
/// Everything else — the HTTP/2 preface (h2c), `Upgrade: h2c`, `Expect`, chunked request bodies, asynchronous
/// submissions, a request that has to wait for a slot or start an instance, a refused connect, a request that
/// fails routing (404 and friends), a malformed head — hands the connection over to SwiftNIO: the socket and
/// every byte not yet served go to an `EdgeProtocolDetector` pipeline on a gateway event loop, which serves the
/// connection from then on. Nothing is answered twice or lost: a request is handed over only before any of it
/// reached an instance, or when a kept-alive instance connection closed before answering a request without a
/// body (the case the NIO handler retries too).
final class EdgeReactor: @unchecked Sendable {
    let shared: GatewayShared
    let listenFD: Int32
    /// The port the listening socket is bound to.
    let port: Int
    private var loops: [ReactorLoop] = []
    private let group: any EventLoopGroup
    private let running = Mutex<Int>(0)
    /// Client connections the reactor threads serve now (handed-over ones are counted by the NIO side).
    let openConnections = Atomic<Int>(0)
    let draining = Atomic<Bool>(false)
    let stopping = Atomic<Bool>(false)

    /// Binds `host:port` (port 0: a free port). Throws with the address and the system's reason.
    init(shared: GatewayShared, host: String, port: Int, threads: Int, group: any EventLoopGroup) throws(ApusError) {
        self.shared = shared
        self.group = group
        (listenFD, self.port) = try Self.listen(host: host, port: port)
        let loopsOfGroup = Array(group.makeIterator())
        for index in 0..<max(1, threads) {
            let nioLoop = loopsOfGroup[index % loopsOfGroup.count]
            loops.append(try ReactorLoop(reactor: self, index: index, handoffLoop: nioLoop,
                                         shardKey: shared.shardKey(for: nioLoop)))
        }
    }

    private let acceptCounter = Atomic<Int>(0)

    /// The loop that serves the next accepted connection: each in turn.
    func loopForNextConnection() -> ReactorLoop {
        loops[acceptCounter.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count]
    }

    /// Starts one thread per loop.
    func start() {
        running.withLock { $0 = loops.count }
        for loop in loops {
            let thread = Thread { [self] in
                loop.run()
                running.withLock { $0 -= 1 }
            }
            thread.name = "apus-reactor-\(loop.index)"  // at most 15 characters (Linux)
            thread.start()
        }
    }

    /// Graceful shutdown, first step: stop accepting; idle connections close now, busy ones after their
    /// current response.
    func drain() {
        draining.store(true, ordering: .releasing)
        // New connections are refused from now on (the descriptor itself is closed once the threads are done).
        shutdown(listenFD, Int32(SHUT_RDWR))
        for loop in loops { loop.wake() }
    }

    /// Closes everything still open and waits for the threads to end.
    func stop() async {
        stopping.store(true, ordering: .releasing)
        for loop in loops { loop.wake() }
        while running.withLock({ $0 }) > 0 {
            try? await Task.sleep(for: .milliseconds(5))
        }
        Glibc.close(listenFD)
    }

    /// Gives a client connection to SwiftNIO: `bytes` are what was read from it and not yet served.
    func handOff(fd: Int32, bytes: ByteBuffer, to loop: any EventLoop) {
        let shared = self.shared
        let bootstrap = ClientBootstrap(group: loop).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                _ = shared.admit(channel, force: true)  // admitted by the reactor already
                try channel.pipeline.syncOperations.addHandler(ConnectionTimeouts(shared.configuration))
                try channel.pipeline.syncOperations.addHandler(ReplayReadBytes(bytes))
                try channel.pipeline.syncOperations.addHandler(EdgeProtocolDetector(shared: shared))
            }
        }
        bootstrap.withConnectedSocket(fd).whenFailure { error in
            shared.logger.warning("cannot hand an HTTP connection to the NIO handler", metadata: ["error": "\(error)"])
        }
    }

    private static func listen(host: String, port: Int) throws(ApusError) -> (Int32, Int) {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var found: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &found)
        guard status == 0, let info = found else {
            throw ApusError(.badRequest, "cannot resolve the gateway address \(host): \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(found) }
        let fd = socket(info.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ApusError(.internal, "cannot open a socket for \(host):\(port): \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0, Glibc.listen(fd, 1024) == 0 else {
            let reason = String(cString: strerror(errno))
            Glibc.close(fd)
            throw ApusError(.unavailable, "cannot listen on \(host):\(port): \(reason)")
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let bound = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard bound == 0 else { return (fd, port) }
        return (fd, SocketAddresses.port(of: storage))
    }
}

/// Socket addresses as the reactor needs them.
enum SocketAddresses {
    static func port(of storage: sockaddr_storage) -> Int {
        var storage = storage
        let family = Int32(storage.ss_family)
        return withUnsafePointer(to: &storage) { pointer in
            if family == AF_INET6 {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin6_port)) }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
    }

    /// The peer's IP address as text (for `X-Forwarded-For`), or "unknown".
    static func peer(of fd: Int32) -> String {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        guard ok == 0 else { return "unknown" }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        let family = Int32(storage.ss_family)
        let converted: UnsafePointer<CChar>? = withUnsafePointer(to: &storage) { pointer in
            if family == AF_INET6 {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { address in
                    var raw = address.pointee.sin6_addr
                    return inet_ntop(AF_INET6, &raw, &text, socklen_t(text.count))
                }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { address in
                var raw = address.pointee.sin_addr
                return inet_ntop(AF_INET, &raw, &text, socklen_t(text.count))
            }
        }
        guard converted != nil else { return "unknown" }
        return String(cString: text)
    }

    /// A non-blocking connect to an instance; nil if the socket could not even be opened.
    static func connectInstance(_ endpoint: InstanceEndpoint) -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(endpoint.port).bigEndian
        address.sin_addr.s_addr = endpoint.address.bigEndian
        let status = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if status != 0 && errno != EINPROGRESS {
            // Reported like an asynchronous failure: the caller sees the error on the first event.
            Glibc.close(fd)
            return nil
        }
        return fd
    }
}

/// Plain socket reads and writes into and out of `ByteBuffer`s.
enum SocketIO {
    enum ReadResult {
        /// Bytes arrived; `drained` when the read did not fill the space offered (nothing more waits now).
        case bytes(drained: Bool)
        case wouldBlock
        case endOfFile
        case failed
    }

    static let readSize = 16 << 10

    /// Keeps a buffer that is read from and appended to from growing: bytes already consumed are dropped (for
    /// free when nothing is left, by a move of the rest once enough has been consumed). Without it the writer
    /// index only grows and every append past the capacity reallocates.
    @inline(__always)
    static func compact(_ buffer: inout ByteBuffer) {
        if buffer.readableBytes == 0 {
            if buffer.writerIndex > 0 { buffer.clear() }
        } else if buffer.readerIndex >= readSize {
            buffer.discardReadBytes()
        }
    }

    static func read(_ fd: Int32, into buffer: inout ByteBuffer) -> ReadResult {
        var result = ReadResult.wouldBlock
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: readSize) { space in
            let count = apus_read(fd, space.baseAddress, UInt(space.count))
            if count > 0 {
                result = .bytes(drained: count < space.count)
                return count
            }
            if count == 0 {
                result = .endOfFile
            } else {
                result = (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? .wouldBlock : .failed
            }
            return 0
        }
        return result
    }

    /// Writes what it can of `buffer`. False when the connection is broken.
    static func flush(_ fd: Int32, _ buffer: inout ByteBuffer) -> Bool {
        while buffer.readableBytes > 0 {
            let count = buffer.withUnsafeReadableBytes { bytes in
                apus_send(fd, bytes.baseAddress, UInt(bytes.count))
            }
            if count > 0 {
                buffer.moveReaderIndex(forwardBy: count)
                continue
            }
            if count < 0 && errno == EINTR { continue }
            let wouldBlock = count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)
            compact(&buffer)
            return wouldBlock
        }
        buffer.clear()
        return true
    }
}

/// First handler of a connection handed over by the reactor: passes on the bytes the reactor had read, as if
/// they had just arrived, then steps aside.
final class ReplayReadBytes: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var bytes: ByteBuffer?

    init(_ bytes: ByteBuffer) {
        self.bytes = bytes
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        if let bytes, bytes.readableBytes > 0 {
            self.bytes = nil
            context.fireChannelRead(wrapInboundOut(bytes))
            // The end of a read burst: handlers that hold their writes until then (HTTP/2 flush coalescing)
            // answer now rather than at the next read, which may never come.
            context.fireChannelReadComplete()
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
