import ApusCore
import ApusScheduler
import ApusWire
import Logging
import NIOCore
import NIOHPACK
import NIOHTTP2

/// One gRPC call from a client, relayed to a function instance over a multiplexed HTTP/2 connection. The edge
/// reads only what routing needs (`:path`, `apus-function`, `apus-version`, `grpc-timeout`); messages pass through
/// frame by frame in both directions. On both connections the call is a stream ID, not a channel: on the client's
/// it is claimed by `EdgeHTTP2Streams`, on the instance's it is owned on `InstanceConnectionHandler`. Flow control
/// is end to end: this call reads from the client only while the instance's stream window has room, and the
/// instance's stream window is given back only as the client takes the bytes. Lives on the client connection's
/// event loop, like the instance connection it uses.
final class GRPCEdgeStream: EdgeStreamOwner, LoopSlotTarget, InstanceStreamOwner, DeadlineTarget {

    enum Phase {
        case idle
        /// An `apus-invocation: async` call: reading its request message (`GRPCEdgeStream+Async.swift`).
        case collectingAsync
        /// Waiting for the task store to take it.
        case submittingAsync
        case waitingForSlot
        case connecting
        case relaying
        case finished
    }

    let shared: GatewayShared
    private let peer: String
    /// The client connection's frame-level handler and the call's stream on it.
    let edge: EdgeHTTP2Streams
    let streamID: HTTP2StreamID
    let eventLoop: any EventLoop
    var phase = Phase.idle
    var requestID = ""
    var rpcPath = ""
    var version: FunctionVersion?
    private var slot = CallSlot()
    private var retried = false
    private(set) var deadline = ContinuousClock.now
    /// This call's place in the event loop's `CallDeadlines` (-1: not there).
    var deadlineSlot = -1
    /// The call's time budget and whether it is the client's grpc-timeout (else the function's timeout).
    private var budget = Duration.zero
    private var budgetFromClient = false
    /// The event loop's instance connections and call deadlines.
    private var loopPool: InstanceHTTP2Pool?
    private var requestHeaders = HPACKHeaders()
    /// Client frames that arrived before the instance stream was open.
    private var pending: [HTTP2Frame.FramePayload] = []
    /// Request bytes this call holds (waiting for an instance, or an asynchronous body), counted in the gateway's
    /// `httpBodies` budget.
    var heldBody = HeldBodyBytes()

    /// Counts `count` more bytes held; false (and the call ended with RESOURCE_EXHAUSTED) when the gateway holds
    /// its limit.
    func holdBody(_ count: Int) -> Bool {
        guard heldBody.add(count, in: shared) else {
            respondAndFinish(status: GRPCWire.statusResourceExhausted,
                             message: GatewayShared.bodyBufferFull(shared.configuration.httpMaxBufferedBytes).message)
            return false
        }
        return true
    }

    func releaseHeldBody() {
        heldBody.release(in: shared)
    }
    var requestEnded = false
    var responseStarted = false
    /// The last frame to the client is being written: the stream closing now is the normal end, not a cancel.
    var responseEnding = false
    /// The instance ended its side of the stream (END_STREAM): the call is complete there.
    private var instanceEnded = false
    /// The instance connection and the call's stream on it, while relaying.
    private var upstream: InstanceConnectionHandler?
    private var upstreamStreamID = HTTP2StreamID.rootStream
    private var slotWaiter: LoopSlotWaiter?
    /// An asynchronous call's submission while its request is read, and the payload limit.
    var asyncSubmission: TaskSubmission?
    var asyncLimit = 0
    private var arrivedAt = ContinuousClock.now
    /// The call's grpc-status as the client sees it, once known (metrics); a call ending without one was cancelled.
    private var finalStatus: String?

    init(shared: GatewayShared, peer: String, edge: EdgeHTTP2Streams, streamID: HTTP2StreamID, eventLoop: any EventLoop) {
        self.shared = shared
        self.peer = peer
        self.edge = edge
        self.streamID = streamID
        self.eventLoop = eventLoop
    }

    // MARK: client side (EdgeStreamOwner)

    func clientFrame(_ payload: HTTP2Frame.FramePayload) {
        switch payload {
        case .headers(let headers):
            if phase == .idle {
                requestEnded = headers.endStream
                start(headers.headers)
                return
            }
            requestEnded = requestEnded || headers.endStream
            forward(payload)
        case .data(let data):
            requestEnded = requestEnded || data.endStream
            forward(.data(.init(data: data.data, endStream: data.endStream)))
        default:
            break
        }
    }

    func clientStreamWritable() {
        // A slow client slows the instance: response bytes held while it was not writable go back into the
        // instance's window only now (the WINDOW_UPDATE goes out at the end of the read burst).
        guard let upstream else { return }
        upstream.clientTookBytes(on: upstreamStreamID)
        upstream.flush()
    }

    func clientStreamClosed(reason: HTTP2ErrorCode?) {
        guard phase != .finished else { return }
        // The client reset the stream or went away: the call is cancelled on the instance too (a cancellation,
        // not a failure of ours). The stream also closes when the last frame of a complete call goes out.
        if let reason {
            log("call cancelled by the client (RST_STREAM \(reason))", code: "cancelled")
        } else if !responseEnding {
            log("call cancelled by the client", code: "cancelled")
        }
        finish()
    }

    func clientBufferFull() {
        guard phase != .finished else { return }
        respondAndFinish(status: GRPCWire.statusResourceExhausted,
                         message: GatewayShared.bodyBufferFull(shared.configuration.httpMaxBufferedBytes).message)
    }

    private func forward(_ payload: HTTP2Frame.FramePayload) {
        switch phase {
        case .relaying:
            guard let upstream else { return }
            upstream.write(payload, on: upstreamStreamID)
            // Inside a read burst (the client's, or waiting frames handed over) the flush waits for its end.
            upstream.flush()
            // A slow instance slows the client.
            if !upstream.canSend(on: upstreamStreamID) { edge.setReading(false, on: streamID) }
        case .waitingForSlot, .connecting:
            if case .data(let data) = payload, case .byteBuffer(let bytes) = data.data, !holdBody(bytes.readableBytes) { return }
            pending.append(payload)
        case .collectingAsync: collectAsync(payload)
        case .idle, .finished, .submittingAsync: break
        }
    }

    // MARK: routing

    private func start(_ headers: HPACKHeaders) {
        arrivedAt = .now
        let pool = shared.instanceHTTP2Pool(for: eventLoop)
        loopPool = pool
        requestID = shared.requestIDs.next()
        // One pass over the request's fields for the few the edge reads (names are lowercase: HTTP/2 requires
        // it and the edge's HTTP/2 handler validates it).
        var path: String?
        var pinnedFunction: String?
        var pinnedVersionText: String?
        var invocationMode: String?
        var timeoutText: String?
        var credential: String?
        var credentials = 0
        for field in headers {
            switch field.name {
            case ":path": if path == nil { path = field.value }
            case "apus-function": if pinnedFunction == nil { pinnedFunction = field.value }
            case "apus-version": if pinnedVersionText == nil { pinnedVersionText = field.value }
            case "apus-invocation": if invocationMode == nil { invocationMode = field.value }
            case "grpc-timeout": if timeoutText == nil { timeoutText = field.value }
            case "authorization":
                credentials += 1
                if credential == nil { credential = field.value }
            default: break
            }
        }
        rpcPath = path ?? ""
        requestHeaders = headers
        let route: (service: Substring, method: Substring)
        do throws(ApusError) {
            route = try Self.splitPath(rpcPath)
        } catch {
            respondAndFinish(status: GRPCWire.statusUnimplemented, message: error.message)
            return
        }
        let functionName: String
        if let pinnedFunction {
            functionName = pinnedFunction
        } else if let owner = shared.scheduler.catalog.function(servingGRPCService: String(route.service)) {
            functionName = owner
        } else {
            respondAndFinish(status: GRPCWire.statusUnimplemented, message: "unknown service \(route.service): no function serves it")
            return
        }
        let version: FunctionVersion
        var invocation = Invocation(requestID: requestID, function: functionName, pinnedVersion: nil, method: String(route.method),
                                    path: rpcPath, callerProtocol: .grpc)
        do throws(ApusError) {
            guard credentials <= 1 else { throw ApusError(.badRequest, "more than one authorization header") }
            if try !shared.authorizeInvocation(function: functionName, credential: credential) {
                requestHeaders.remove(name: "authorization")
            }
            invocation.pinnedVersion = try VersionPin.parse(pinnedVersionText, name: "apus-version")
            version = try shared.dispatcher.version(for: invocation, roll: shared.roll(on: pool.eventLoop))
        } catch {
            let status = error.code == .notFound && pinnedFunction == nil ? GRPCWire.statusUnimplemented : GRPCWire.status(for: error)
            respondAndFinish(status: status, message: error.message)
            return
        }
        self.version = version
        if let invocationMode {
            guard invocationMode == "async" else {
                respondAndFinish(status: GRPCWire.statusInvalidArgument, message: "apus-invocation must be async (got \"\(invocationMode.prefix(32))\")")
                return
            }
            startAsync(headers)
            return
        }

        // The call's deadline: the client's grpc-timeout when given, never beyond the function's timeout.
        if let text = timeoutText {
            guard let timeout = GRPCWire.parseTimeout(text) else {
                respondAndFinish(status: GRPCWire.statusInternal, message: "malformed grpc-timeout \"\(text.prefix(16))\"")
                return
            }
            invocation.callerBudget = timeout
        }
        let dispatch = shared.dispatcher.dispatch(&invocation, to: version)
        budget = dispatch.budget
        budgetFromClient = dispatch.budgetFromCaller
        deadline = dispatch.deadline
        shared.callDeadlines(for: pool.eventLoop).add(self)

        // Until the instance stream is open, client frames wait here (bounded by the stream's flow-control window).
        edge.setReading(false, on: streamID)
        slot.pool = dispatch.pool
        acquireSlot()
    }

    /// `/package.Service/Method` → (`package.Service`, `Method`).
    static func splitPath(_ path: String) throws(ApusError) -> (service: Substring, method: Substring) {
        // Slices of the path, without building an array of parts.
        let rest = path.dropFirst()
        if path.first == "/", let slash = rest.firstIndex(of: "/") {
            let service = rest[..<slash]
            let method = rest[rest.index(after: slash)...]
            if !service.isEmpty, !method.isEmpty, !method.contains("/") { return (service, method) }
        }
        throw ApusError(.notFound, "malformed gRPC path \"\(path.prefix(200))\"; expected /package.Service/Method")
    }

    private func acquireSlot() {
        if slotWaiter == nil { slotWaiter = LoopSlotWaiter(NIOLoopBound<any LoopSlotTarget>(self, eventLoop: eventLoop)) }
        proceed(slot.acquire(requestID: requestID, deadline: deadline, waiter: slotWaiter!, shard: shared.shardKey(for: eventLoop)))
    }

    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
        proceed(slot.decided(result, stillWaiting: phase == .waitingForSlot && requestID == self.requestID))
    }

    private func proceed(_ outcome: CallSlot.Outcome?) {
        switch outcome {
        case .leased: openUpstream()
        case .failed(let error): fail(error)
        case .waiting: phase = .waitingForSlot
        case nil: break
        }
    }

    // MARK: instance side

    private func openUpstream() {
        guard let lease = slot.lease else { return }
        phase = .connecting
        let requestID = self.requestID
        (loopPool ?? shared.instanceHTTP2Pool(for: eventLoop)).connection(instanceID: lease.instanceID, endpoint: lease.endpoint) { [self] result in
            guard phase == .connecting, requestID == self.requestID else { return }
            switch result {
            case .success(let connection):
                if !relayStarted(on: connection) {
                    upstreamFailed(lease: lease, .streamFailed(ChannelError.ioOnClosedChannel))
                }
            case .failure(let error):
                upstreamFailed(lease: lease, error)
            }
        }
    }

    private func upstreamFailed(lease: InstancePool.Lease, _ error: InstanceStreamError) {
        if case .connectFailed = error {
            // Nobody listens there: take the instance out of service and try another once.
            slot.reportUnreachable()
            if retried {
                fail(ApusError(.unavailable, "cannot connect to instance \(lease.instanceID): \(error)"))
            } else {
                retried = true
                acquireSlot()
            }
        } else if retried {
            fail(ApusError(.unavailable, "cannot open a stream to instance \(lease.instanceID): \(error)"))
        } else {
            // The connection went away (GOAWAY, closed) before the stream opened: a new one will do.
            retried = true
            openUpstream()
        }
    }

    /// Starts the call's stream on the instance connection: request HEADERS, then what the client sent so far.
    /// False when the connection takes no new streams.
    private func relayStarted(on connection: InstanceConnectionHandler) -> Bool {
        guard let version else { return true }
        var headers = HPACKHeaders()
        headers.reserveCapacity(requestHeaders.count + 6)
        for (name, value, indexing) in requestHeaders where name != "grpc-timeout" {
            headers.add(name: name, value: value, indexing: indexing)
        }
        // Values that change on every call stay out of the HPACK dynamic table (it would only churn).
        headers.add(name: "grpc-timeout", value: GRPCWire.formatTimeout(deadline - .now), indexing: .nonIndexable)
        headers.add(name: "x-apus-request-id", value: requestID, indexing: .nonIndexable)
        headers.add(name: "x-apus-function", value: version.function)
        headers.add(name: "x-apus-version", value: String(version.number))
        headers.add(name: "x-forwarded-for", value: peer)
        let endedWithHeaders = requestEnded && pending.isEmpty
        guard let streamID = connection.startStream(owner: self, headers: headers, endStream: endedWithHeaders) else {
            return false
        }
        upstream = connection
        upstreamStreamID = streamID
        phase = .relaying
        for payload in pending { connection.write(payload, on: streamID) }
        pending = []
        releaseHeldBody()
        // Inside a read burst the instance connection is flushed once at its end (`DeferredFlushes`).
        connection.flush()
        edge.setReading(connection.canSend(on: streamID), on: self.streamID)
        return true
    }

    // MARK: InstanceStreamOwner

    var clientWritable: Bool { edge.isWritable(streamID) }

    func instanceFrame(_ payload: HTTP2Frame.FramePayload) {
        guard phase == .relaying else { return }
        switch payload {
        case .headers(let headers):
            if headers.endStream {
                responseEnding = true
                instanceEnded = true
                finalStatus = headers.headers.first(name: "grpc-status") ?? GRPCWire.statusCodeLabel(GRPCWire.statusInternal)
            }
            if !responseStarted {
                responseStarted = true
                var response = headers.headers
                response.add(name: "apus-request-id", value: requestID, indexing: .nonIndexable)
                edge.write(.headers(.init(headers: response, endStream: headers.endStream)), on: streamID)
            } else {
                edge.write(payload, on: streamID)
            }
            // The end of the instance's read burst flushes it (instanceReadComplete), also after finish().
            if headers.endStream { finish() }
        case .data(let data):
            responseStarted = true
            if data.endStream {
                responseEnding = true
                instanceEnded = true
            }
            edge.write(.data(.init(data: data.data, endStream: data.endStream)), on: streamID)
            if data.endStream { finish() }
        default:
            break
        }
    }

    func instanceReadComplete() {
        edge.flush()
    }

    func instanceStreamWritable() {
        if phase == .relaying { edge.setReading(true, on: streamID) }
    }

    func instanceStreamFailed(_ reason: String) {
        guard phase == .relaying else { return }
        upstream = nil
        let instanceID = slot.lease?.instanceID
        let reason = "instance \(instanceID ?? "?") ended the stream without a status: \(reason)"
        guard let loop = edge.eventLoop else {
            fail(shared.instanceFailure(reason, instanceID: instanceID).error)
            return
        }
        shared.settleInstanceFailure(reason, instanceID: instanceID, on: loop) { [self] error, _ in
            guard phase == .relaying, upstream == nil else { return }  // ended meanwhile (deadline, cancel)
            fail(error)
        }
    }

    // MARK: endings

    func deadlinePassed() {
        guard phase != .finished else { return }
        let budgetDescription = budgetFromClient ? "grpc-timeout of \(budget.humanReadable)" : "function timeout of \(budget.humanReadable)"
        fail(ApusError(.deadlineExceeded, "deadline exceeded: no answer within the \(budgetDescription)"))
    }

    /// Ends the call with an error status: as Trailers-Only when nothing was sent yet, else as trailers.
    private func fail(_ error: ApusError) {
        guard phase != .finished else { return }
        log(error.message, code: error.code.name)
        respondAndFinish(status: GRPCWire.status(for: error), message: error.message)
    }

    func respondAndFinish(status: Int, message: String) {
        let headers = responseStarted
            ? GRPCWire.trailers(status: status, message: message)
            : GRPCWire.trailersOnly(status: status, message: message)
        var withID = headers
        finalStatus = GRPCWire.statusCodeLabel(status)
        if !responseStarted, !requestID.isEmpty { withID.add(name: "apus-request-id", value: requestID, indexing: .nonIndexable) }
        responseStarted = true
        responseEnding = true
        edge.write(.headers(.init(headers: withID, endStream: true)), on: streamID)
        edge.flush()
        finish()
    }

    /// Gives back everything the call holds. A request side the client has not finished is reset.
    func finish() {
        guard phase != .finished else { return }
        phase = .finished
        slot.pool?.metrics.recordRequest(protocol: "grpc", code: finalStatus ?? GRPCWire.statusCodeLabel(GRPCWire.statusCancelled), since: arrivedAt)
        if deadlineSlot >= 0, let loopPool { shared.callDeadlines(for: loopPool.eventLoop).remove(self) }
        pending = []
        releaseHeldBody()
        slot.giveBack(requestID: requestID)
        if let upstream {
            // The instance finished the call: resetting its stream now would be noise (and servers count resets
            // as abuse); if the client never finished sending, half-close our side instead. Otherwise the call
            // was cut short here (client cancel, deadline, error): RST_STREAM(CANCEL) ends it on the instance too.
            upstream.release(upstreamStreamID, reset: !instanceEnded, endRequest: instanceEnded && !requestEnded)
            self.upstream = nil
        }
        // A stream still open is ended: RST_STREAM(CANCEL) when the call was cut short, RST_STREAM(NO_ERROR) when
        // the response is complete while the client is still sending.
        edge.release(streamID, responseEnded: responseEnding)
        slotWaiter = nil
    }

    private func log(_ reason: String, code: String) {
        shared.logger.info("grpc call failed", metadata: [
            "requestID": "\(requestID)", "function": "\(version?.function ?? "-")",
            "version": "\(version.map { String($0.number) } ?? "-")", "rpc": "\(rpcPath)",
            "code": "\(code)", "reason": "\(reason)",
        ])
    }
}
