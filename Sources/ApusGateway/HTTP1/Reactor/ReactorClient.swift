import ApusCore
import ApusScheduler
import ApusWire
import CApusShims
import Glibc
import Logging
import NIOCore

/// One client connection on a reactor loop: reads request heads, starts the requests it can serve at once
/// (see `EdgeReactor`), relays them to an instance and the responses back, and hands the connection to SwiftNIO
/// for everything else. Requests are served one after the other (pipelined ones wait in `inbound`).
final class ReactorClient: ReactorSocket {
    enum Phase {
        case readingHead
        /// The request went to an instance connection; its response is being relayed.
        case forwarding
        /// Waiting for the response in `out` to be written before the connection goes to SwiftNIO.
        case handingOff
        case closed
    }

    private(set) var phase = Phase.readingHead
    private var inbound: ByteBuffer
    /// Bytes for the client that the socket did not take yet.
    private(set) var out: ByteBuffer
    /// The kernel may hold bytes from the client that were not read yet (edge-triggered).
    private var readable = false
    private var readPaused = false
    private var closeWhenFlushed = false
    private var draining = false
    private var processing = false
    /// Whether the connection's first bytes were looked at (the HTTP/2 preface test).
    private var sniffed = false
    let peer: String

    // The request in progress (phase `forwarding`).
    private var target: ReactorLoop.Target?
    private var lease: InstancePool.Lease?
    private var requestID = ""
    private var isHTTP10 = false
    private var hasBody = false
    private var bodyRemaining = 0
    private var closeAfter = false
    /// When the request arrived and when it must be answered, on the monotonic clock in nanoseconds as the
    /// loop read it for the pass (`ReactorLoop.passNanoseconds`: cheaper to subtract than `ContinuousClock`
    /// instants).
    private var deadline: UInt64 = 0
    private var arrivedAt: UInt64 = 0
    private(set) var responseStarted = false
    private var status = 0
    private var upstream: ReactorUpstream?
    /// The instance failed the request while its process still runs: why, and until when (loop nanoseconds) to
    /// wait for its end before answering without knowing more.
    private var settlingFailure: (reason: String, until: UInt64)?
    /// The request's head as the client sent it, until the response begins: what a hand-over replays.
    private var pendingHead: ByteBuffer
    private var headInFlight = false
    /// When the connection became ready for its next request (opened, or its last response handed over): the
    /// idle and request-head timeouts count from here.
    private var readySince: UInt64

    static let maxHead = 64 << 10
    /// Bytes buffered in one direction before the other side stops being read.
    static let maxBufferedAhead = 256 << 10

    init(fd: Int32, loop: ReactorLoop, peer: String) {
        self.peer = peer
        inbound = loop.allocator.buffer(capacity: 0)
        out = loop.allocator.buffer(capacity: 0)
        pendingHead = loop.allocator.buffer(capacity: 0)
        readySince = loop.passNanoseconds
        super.init(fd: fd, loop: loop)
    }

    override func handle(_ events: UInt32) {
        if events & (APUS_EV_IN | APUS_EV_RDHUP | APUS_EV_HUP | APUS_EV_ERR) != 0 { readable = true }
        if events & APUS_EV_OUT != 0, out.readableBytes > 0 { flushNow() }
        if readable { readAvailable() }
    }

    // MARK: reading requests

    private var reading = false

    private var mayRead: Bool { readable && !readPaused && (phase == .readingHead || phase == .forwarding) }

    /// Reads what the kernel holds and serves it, until there is nothing more or reading has to pause.
    private func readAvailable() {
        guard !reading else { return }  // the loop below will see the change
        reading = true
        defer { reading = false }
        repeat {
            while mayRead {
                SocketIO.compact(&inbound)
                switch SocketIO.read(fd, into: &inbound) {
                case .bytes(let drained):
                    if drained { readable = false }
                    if inbound.readableBytes > Self.maxBufferedAhead { readPaused = true }
                case .wouldBlock:
                    readable = false
                case .endOfFile, .failed:
                    // Like the NIO handler (no half-closure): the client is gone, so is its request.
                    abort()
                    return
                }
            }
            process()
            guard countHeldBodyBytes() else {
                // The gateway holds its limit of request bytes over all connections: this one goes.
                abort()
                return
            }
        } while mayRead
    }

    /// Bytes read ahead past `BufferedBytesBudget.freePerConnection`, counted in the gateway's `httpBodies` budget.
    private var heldBody = HeldBodyBytes()

    /// Re-counts what this connection reads ahead; false when that would take the gateway past its limit.
    private func countHeldBodyBytes() -> Bool {
        heldBody.set(max(0, inbound.readableBytes - BufferedBytesBudget.freePerConnection), in: loop.reactor.shared)
    }

    private func releaseHeldBodyBytes() {
        heldBody.release(in: loop.reactor.shared)
    }

    /// Serves requests already buffered and reads on if reading had paused.
    private func serveMore() {
        if reading { process() } else { readAvailable() }
    }

    /// Serves whatever complete requests are buffered. Not re-entrant.
    func process() {
        guard !processing else { return }
        processing = true
        defer { processing = false }
        while phase == .readingHead, inbound.readableBytes > 0 {
            if !sniffed {
                if EdgePipeline.sniff(inbound.readableBytesView) != .http1 {
                    handOff()  // HTTP/2 with prior knowledge, the start of it, or an invalid preface (GOAWAY there)
                    return
                }
                sniffed = true
            }
            let parsed: (RequestHead, Int)?? = inbound.withUnsafeReadableBytes { bytes in
                guard let end = HTTPBytes.endOfHead(bytes) else { return .some(nil) }
                guard let head = try? RequestHead.parse(bytes, headEnd: end, maxBody: loop.maxRequestBytes) else {
                    return nil  // malformed: the NIO handler answers with the reason
                }
                return (head, end)
            }
            guard let parsed else {
                handOff()
                return
            }
            guard let (head, end) = parsed else {
                if inbound.readableBytes > Self.maxHead { handOff() }
                break
            }
            guard end <= Self.maxHead, start(head, headLength: end) else {
                handOff()
                return
            }
        }
        if phase == .forwarding { pumpBody() }
        updateReading()
    }

    /// Starts a request if it is one the reactor serves; false: hand the connection over instead.
    private func start(_ head: RequestHead, headLength: Int) -> Bool {
        switch head.framing {
        case .none, .length: break
        case .chunked, .untilClose: return false
        }
        guard !head.upgradeToH2C, !head.expectContinue, !head.asyncInvocation,
              !head.target.hasPrefix(GatewayConnectionHandler.asyncPrefix), !draining else { return false }
        guard let route = try? GatewayRoute.resolve(
            host: head.host, uri: head.target, domain: loop.domain, catalog: loop.catalog) else {
            return false
        }
        let pinned: Int?
        do { pinned = try head.pinnedVersionNumber() } catch { return false }  // the NIO handler answers why
        guard let target = loop.target(function: route.function, pinnedVersion: pinned), target.servesHTTP,
              let lease = target.pool.tryAcquire(shard: loop.shardKey, now: loop.passInstant) else { return false }
        let pool = target.pool
        let requestID = loop.requestIDs.next()
        guard let upstream = loop.upstream(instanceID: lease.instanceID, endpoint: lease.endpoint) else {
            pool.release(lease, now: loop.passInstant)
            return false
        }
        // Committed: from here on the request is this connection's to finish.
        pendingHead.clear()
        inbound.readWithUnsafeReadableBytes { bytes in
            pendingHead.writeBytes(UnsafeRawBufferPointer(rebasing: bytes.prefix(headLength)))
            return headLength
        }
        headInFlight = true
        self.target = target
        self.lease = lease
        self.requestID = requestID
        self.upstream = upstream
        isHTTP10 = head.isHTTP10
        if case .length(let length) = head.framing {
            hasBody = true
            bodyRemaining = length
        } else {
            hasBody = false
            bodyRemaining = 0
        }
        closeAfter = !head.keepAlive
        responseStarted = false
        status = 0
        arrivedAt = loop.passNanoseconds
        deadline = arrivedAt &+ target.timeoutNanoseconds
        phase = .forwarding
        upstream.begin(client: self, requestWasHEAD: head.isHEAD)
        GatewayConnectionHandler.writeUpstreamHead(
            into: &upstream.out, head, rawHead: pendingHead, route: route, requestID: requestID, function: target.function,
            versionNumber: target.versionNumber, timeoutMilliseconds: target.timeoutMilliseconds,
            peer: peer, scheme: "http", wallClockMilliseconds: loop.passWallClockMilliseconds)
        pumpBody()
        upstream.flush()
        return true
    }

    /// Moves request body bytes that have arrived to the instance connection.
    private func pumpBody() {
        // Body bytes wait in `inbound` until the instance connection is up, so a refused connect can hand the
        // whole request over.
        guard bodyRemaining > 0, inbound.readableBytes > 0, let upstream, upstream.isConnected else { return }
        let take = min(bodyRemaining, inbound.readableBytes)
        inbound.readWithUnsafeReadableBytes { bytes in
            upstream.out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes.prefix(take)))
            return take
        }
        bodyRemaining -= take
        upstream.flush()
    }

    /// Reading pauses while too much is buffered ahead or the instance connection has too much to write.
    private func updateReading() {
        let upstreamBacklog = upstream?.out.readableBytes ?? 0
        let pause = inbound.readableBytes > Self.maxBufferedAhead || upstreamBacklog > Self.maxBufferedAhead
        readPaused = pause
    }

    /// The instance connection is up: the body can follow the head.
    func upstreamConnected() {
        upstreamDrained()
    }

    /// The instance connection wrote its backlog: the client may be read again.
    func upstreamDrained() {
        if phase == .forwarding, bodyRemaining > 0 { pumpBody() }
        updateReading()
        if mayRead { readAvailable() }
    }

    // MARK: the instance's answer

    /// Appends the instance's response head (kept lines from `bytes`) with the gateway's headers to `out`.
    func responseHead(_ bytes: UnsafeRawBufferPointer, _ head: ResponseHead) {
        responseStarted = true
        headInFlight = false
        status = head.status
        if case .untilClose = head.framing { closeAfter = true }
        if bodyRemaining > 0 { closeAfter = true }  // answered before the body was read: the rest cannot be skipped safely
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: bytes.count) { space in
            var w = HeadWriter(space)
            head.keptSpans.forEach { span in w.add(UnsafeRawBufferPointer(rebasing: bytes[span])) }
            return w.count
        }
        GatewayConnectionHandler.endResponseHead(&out, version: target?.versionNumber ?? 0, requestID: requestID, close: closeAfter, http10: isHTTP10)
    }

    /// An interim (1xx) response: passed on as it is.
    func interimResponse(_ bytes: UnsafeRawBufferPointer, _ head: ResponseHead) {
        head.keptSpans.forEach { span in out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[span])) }
        out.writeStatic("\r\n")
    }

    func responseBody(_ bytes: UnsafeRawBufferPointer) {
        out.writeBytes(bytes)
    }

    /// Whether the client has so much unwritten that the instance connection should stop being read.
    var isBackedUp: Bool { out.readableBytes > Self.maxBufferedAhead }

    /// The response is complete. `reusable`: the instance connection may serve another request.
    func responseComplete(reusable: Bool) {
        guard phase == .forwarding, let upstream, let target else { return }
        giveBackSlot()
        target.pool.metrics.recordHTTPRequest(status: status, elapsedNanoseconds: elapsedNanoseconds)
        if reusable && bodyRemaining == 0 { loop.release(upstream) } else { upstream.close() }
        endExchange()
        afterResponse(close: closeAfter || draining)
    }

    /// A response is in `out`: the connection closes once it is written, or goes on with the next request
    /// (writes leave at the end of the loop's pass, so the next request may start before).
    private func afterResponse(close: Bool) {
        if close {
            closeWhenFlushed = true
            flush()
        } else {
            phase = .readingHead
            readySince = loop.passNanoseconds
            flush()
            serveMore()
        }
    }

    /// The instance connection failed before the response was complete.
    func upstreamFailed(_ reason: String, retryable: Bool) {
        guard phase == .forwarding, let upstream else { return }
        upstream.close()
        let failure = loop.reactor.shared.instanceFailure(reason, instanceID: lease?.instanceID)
        if retryable, !failure.known, headInFlight, !responseStarted, !hasBody {
            // A kept-alive connection the instance had already closed: the NIO handler sends the request again
            // on a fresh one (it has not been answered, and it has no body).
            giveBackSlot()
            endExchange()
            replayPendingHead()
            handOff()
            return
        }
        if !failure.known, let instanceID = lease?.instanceID, loop.reactor.shared.scheduler.instanceIsRunning(instanceID) {
            // The instance may be dying (an OOM kill): its end, moments later, says why. The loop's deadline
            // scan asks again until then (`checkDeadline`).
            self.upstream = nil
            settlingFailure = (reason, loop.passNanoseconds &+ UInt64(GatewayShared.instanceEndWait.nanoseconds))
            return
        }
        failExchange(failure.error)
    }

    /// Asks again whether the runtime knows why the instance failed the request; answers once it does, the
    /// instance's process is gone, or the wait is over.
    private func settleFailure(_ settling: (reason: String, until: UInt64), now: UInt64) {
        let shared = loop.reactor.shared
        let failure = shared.instanceFailure(settling.reason, instanceID: lease?.instanceID)
        if !failure.known, now < settling.until, let instanceID = lease?.instanceID, shared.scheduler.instanceIsRunning(instanceID) {
            return
        }
        failExchange(failure.error)
    }

    /// The connection to the instance could not be made: nothing was sent, so the request goes to the NIO
    /// handler, which takes another slot (this instance is out of service now) or answers the failure.
    func upstreamConnectFailed() {
        guard phase == .forwarding, upstream != nil else { return }
        if let lease, let pool = target?.pool { pool.reportUnreachable(lease) }
        upstream?.close()
        endExchange()
        replayPendingHead()
        handOff()
    }

    private func replayPendingHead() {
        guard pendingHead.readableBytes > 0 else { return }
        var replay = pendingHead
        replay.writeBuffer(&inbound)
        inbound = replay
        pendingHead = loop.allocator.buffer(capacity: 0)
    }

    /// The request's slot goes back to its pool (as of the loop's pass).
    private func giveBackSlot() {
        if let lease, let target { target.pool.release(lease, now: loop.passInstant) }
    }

    private func endExchange() {
        settlingFailure = nil
        lease = nil
        upstream = nil
        headInFlight = false
        target = nil
    }

    // MARK: writing to the client

    /// Writes what the socket takes; closes or hands over when that was the last thing to do.
    override func flushNow() {
        guard phase != .closed else { return }
        if out.readableBytes > 0, !SocketIO.flush(fd, &out) {
            abort()
            return
        }
        if out.readableBytes == 0 {
            if closeWhenFlushed {
                close()
                return
            }
            if phase == .handingOff {
                handOff()
                return
            }
        }
        if !isBackedUp, let upstream, upstream.isPaused { upstream.resume() }
    }

    // MARK: endings

    private var elapsedNanoseconds: Int64 { Int64(truncatingIfNeeded: loop.passNanoseconds &- arrivedAt) }

    func checkDeadline(now: UInt64) {
        if phase == .readingHead, out.readableBytes == 0, !closeWhenFlushed {
            // Between requests: an idle keep-alive connection goes after the idle timeout; one that started a
            // head and has not finished it (slowloris) gets 408 after the head timeout.
            let waited = now &- readySince
            if inbound.readableBytes == 0 {
                if waited > loop.idleTimeoutNanoseconds { close() }
            } else if waited > loop.headTimeoutNanoseconds {
                let timeout = Duration.nanoseconds(Int64(loop.headTimeoutNanoseconds))
                var response = GatewayConnectionHandler.errorResponse(
                    ApusError(.requestTimeout, "the request head did not arrive whole within \(timeout.humanReadable)"),
                    requestID: loop.reactor.shared.requestIDs.next(), version: nil, close: true, allocator: loop.allocator)
                inbound.clear()
                out.writeBuffer(&response)
                afterResponse(close: true)
            }
            return
        }
        if phase == .forwarding, let settlingFailure, deadline > now {
            settleFailure(settlingFailure, now: now)
            return
        }
        guard phase == .forwarding, deadline <= now, let target else { return }
        failExchange(ApusError(.deadlineExceeded, "function did not answer within its timeout of \(target.timeout.humanReadable)"))
    }

    /// Ends the request with an error: the client gets it as JSON unless the response already began.
    private func failExchange(_ error: ApusError) {
        guard phase == .forwarding else { return }
        let shared = loop.reactor.shared
        giveBackSlot()
        upstream?.close()
        let started = responseStarted
        target?.pool.metrics.recordRequest(
            protocol: "http",
            code: GatewayConnectionHandler.statusCode(started ? status : error.code.httpStatus), elapsedNanoseconds: elapsedNanoseconds)
        shared.logger.info("request failed", metadata: [
            "requestID": "\(requestID)", "function": "\(target?.function ?? "?")",
            "version": "\(target?.versionNumber ?? 0)", "code": "\(error.code)", "reason": "\(error.message)",
        ])
        let versionNumber = target?.versionNumber
        let mustClose = closeAfter || bodyRemaining > 0 || draining
        endExchange()
        if started {
            // The client sees the instance's status on a cut-short body.
            afterResponse(close: true)
            return
        }
        var response = GatewayConnectionHandler.errorResponse(
            error, requestID: requestID, version: versionNumber, close: mustClose, allocator: loop.allocator)
        out.writeBuffer(&response)
        afterResponse(close: mustClose)
    }

    /// Graceful shutdown: an idle connection closes now, a busy one after its current response.
    func beginDrain() {
        draining = true
        if phase == .readingHead, inbound.readableBytes == 0 {
            afterResponse(close: true)
        } else {
            closeAfter = true
        }
    }

    /// Gives the connection to SwiftNIO with every byte not yet served, once the client has all of its
    /// earlier responses.
    private func handOff() {
        guard phase != .closed else { return }
        if out.readableBytes > 0 {
            phase = .handingOff
            return
        }
        phase = .closed
        releaseHeldBodyBytes()
        loop.forget(self)
        loop.clientClosed()
        let bytes = inbound
        inbound = loop.allocator.buffer(capacity: 0)
        loop.reactor.handOff(fd: fd, bytes: bytes, to: loop.handoffLoop)
    }

    /// The client went away, or the reactor stops: give back what the request holds.
    func abort() {
        guard phase != .closed else { return }
        if phase == .forwarding {
            giveBackSlot()
            target?.pool.metrics.recordRequest(protocol: "http", code: GatewayConnectionHandler.clientClosedCode, elapsedNanoseconds: elapsedNanoseconds)
            upstream?.close()
            endExchange()
        }
        close()
    }

    private func close() {
        guard phase != .closed else { return }
        phase = .closed
        releaseHeldBodyBytes()
        loop.close(self)
        loop.clientClosed()
    }
}
