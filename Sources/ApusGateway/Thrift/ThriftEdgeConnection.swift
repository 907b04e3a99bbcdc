import ApusCore
import ApusScheduler
import ApusWire
import Logging
import NIOCore
import NIOPosix

/// One client connection of the Thrift edge. Each decoded message is routed (multiplexed `Service:method` by
/// service, a plain name by the method table, or pinned by a THeader/TTHeader key), takes a slot, and goes to an
/// instance over a pooled connection in the instance's own framing; the reply comes back in the client's framing.
/// Pipelined calls are dispatched at once and answered in the order they arrived. Oneway calls get no reply,
/// whatever happens to them. Errors are `TApplicationException` replies. Malformed input closes the connection.
final class ThriftEdgeConnection: ChannelInboundHandler, LoopSlotTarget, DrainableConnection {
    typealias InboundIn = ThriftFrame
    typealias OutboundOut = ByteBuffer

    /// One call from this connection.
    final class Call: DeadlineTarget {
        let frame: ThriftFrame
        let requestID: String
        var function: String?
        var version: FunctionVersion?
        var pool: InstancePool?
        var lease: InstancePool.Lease?
        var queued = false
        var retried = false
        var deadline = ContinuousClock.now
        var budgetDescription = ""
        /// Where the loop's `CallDeadlines` keeps the call (-1: not kept), and what to do when it passes.
        var deadlineSlot = -1
        var onDeadline: (() -> Void)?
        var upstream: InstanceThriftConnection?
        /// The message as the instance must see it (multiplexed prefix removed).
        var outbound: ByteBuffer
        /// The reply to write, in the client's framing, once known.
        var reply: ByteBuffer?
        var done = false
        let arrivedAt = ContinuousClock.now
        /// How the call ended, for metrics: `reply`, `exception` (the instance's), `oneway`, or an error name.
        var outcome: String?

        func deadlinePassed() {
            onDeadline?()
        }

        init(frame: ThriftFrame, requestID: String) {
            self.frame = frame
            self.requestID = requestID
            self.outbound = frame.message
        }

        /// A CALL to a method the function's manifest lists under `thrift.oneway` (Go's client sends oneway calls so).
        var onewayByManifest = false

        var isOneway: Bool { frame.envelope.type == .oneway || onewayByManifest }
    }

    static let maxPipelined = 64

    private let shared: GatewayShared
    private var context: ChannelHandlerContext!
    private var calls: [Call] = []
    /// Whether calls wait for their replies (for `ConnectionTimeouts`).
    var hasCallsInProgress: Bool { !calls.isEmpty }
    private var slotWaiter: LoopSlotWaiter?
    private var closed = false
    private var draining = false
    private var readPaused = false
    private var peer = "unknown"

    init(shared: GatewayShared) {
        self.shared = shared
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        slotWaiter = LoopSlotWaiter(NIOLoopBound<any LoopSlotTarget>(self, eventLoop: context.eventLoop))
        if context.channel.isActive { becameActive(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        becameActive(context)
        context.fireChannelActive()
    }

    private var registered = false

    private func becameActive(_ context: ChannelHandlerContext) {
        guard !registered else { return }
        registered = true
        peer = context.channel.remoteAddress?.ipAddress ?? "unknown"
        shared.register(self, id: ObjectIdentifier(self), eventLoop: context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        slotWaiter = nil
        if registered { shared.unregister(id: ObjectIdentifier(self)) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        for call in calls where !call.done { abandon(call) }
        calls.removeAll()
        shared.unregister(id: ObjectIdentifier(self))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Malformed input (or a frame over the limit): this connection ends, nothing else is touched.
        shared.logger.info("thrift connection closed", metadata: ["peer": "\(peer)", "reason": "\(error)"])
        context.close(promise: nil)
    }

    func beginDrain() {
        draining = true
        if calls.isEmpty { context.close(promise: nil) }
    }

    // MARK: calls

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let call = Call(frame: frame, requestID: shared.requestIDs.next())
        if !call.isOneway { calls.append(call) }
        start(call)
        updateReading()
    }

    private func updateReading() {
        let shouldPause = calls.count >= Self.maxPipelined
        guard shouldPause != readPaused else { return }
        readPaused = shouldPause
        context.channel.setReading(!shouldPause)
    }

    private func start(_ call: Call) {
        let envelope = call.frame.envelope
        guard envelope.type == .call || envelope.type == .oneway else {
            fail(call, .protocolError, ApusError(.badRequest, "expected a call, got a message of type \(envelope.type)"))
            return
        }
        let catalog = shared.scheduler.catalog
        var method = envelope.name
        var function: String?
        if let colon = envelope.name.firstIndex(of: ":") {
            let service = String(envelope.name[..<colon])
            method = String(envelope.name[envelope.name.index(after: colon)...])
            function = catalog.function(servingThriftService: service)
            if function == nil {
                fail(call, .unknownMethod, ApusError(.notFound, "unknown service \(service): no function serves it"))
                return
            }
            call.outbound = ThriftWire.renamed(call.frame.message, envelope: envelope, to: method)
        }
        if let pinned = call.frame.headers["apus-function"] {
            function = pinned
        } else if let toService = call.frame.intHeaders[6], !toService.isEmpty {
            function = catalog.function(servingThriftService: toService) ?? (catalog.entry(toService) != nil ? toService : function)
        }
        if function == nil { function = catalog.function(servingThriftMethod: method) }
        call.function = function
        guard let function else {
            fail(call, .unknownMethod, ApusError(.notFound, "unknown method \(method): no function declares it (call Service:\(method) multiplexed, or list it under thrift.methods)"))
            return
        }
        do throws(ApusError) {
            // The credential travels as a THeader/TTHeader string header; framed and buffered calls carry none.
            _ = try shared.authorizeInvocation(function: function, credential: call.frame.headers["authorization"] ?? call.frame.headers["Authorization"])
        } catch {
            fail(call, .unknown, ApusError(error.code, "\(error.code.name): \(error.message)\(call.frame.transport == .framed || call.frame.transport == .buffered ? " (send it in a THeader or TTHeader header named authorization)" : "")"))
            return
        }
        let version: FunctionVersion
        var invocation = Invocation(requestID: call.requestID, function: function, pinnedVersion: nil, method: method, path: "",
                                    callerProtocol: .thrift)
        do throws(ApusError) {
            invocation.pinnedVersion = try VersionPin.parse(call.frame.headers["apus-version"], name: "apus-version")
            version = try shared.dispatcher.version(for: invocation, roll: shared.roll(on: context.eventLoop))
            guard let thrift = version.manifest.thrift else {
                throw ApusError(.internal, "function \(function) serves Thrift without thrift settings")
            }
            guard ThriftEncoding(thrift.protocol) == envelope.encoding else {
                throw ApusError(.badRequest, "the call is \(envelope.encoding.rawValue) but function \(function) speaks \(thrift.protocol.rawValue); the gateway converts transports, not protocols")
            }
        } catch {
            fail(call, error.code == .notFound || error.code == .wrongProtocol ? .unknownMethod : .internalError, error)
            return
        }
        call.version = version
        if envelope.type == .call, version.manifest.thrift?.oneway.contains(method) == true {
            // The client reads no reply to it: it must not hold up the replies behind it.
            call.onewayByManifest = true
            calls.removeAll { $0 === call }
        }
        if call.isOneway, version.manifest.async != nil, let submitter = shared.configuration.tasks {
            submitTask(call, method: method, version: version, pinnedVersion: invocation.pinnedVersion, submitter: submitter)
            return
        }

        invocation.callerBudget = Self.headerTimeout(call.frame)
        let dispatch = shared.dispatcher.dispatch(&invocation, to: version)
        call.budgetDescription = dispatch.budgetDescription
        call.deadline = dispatch.deadline
        call.onDeadline = { [weak self, unowned call] in
            guard let self, !call.done else { return }
            fail(call, .internalError, ApusError(.deadlineExceeded, "deadline exceeded: no reply within the \(call.budgetDescription)"))
        }
        shared.callDeadlines(for: context.eventLoop).add(call)
        call.pool = dispatch.pool
        acquireSlot(call)
    }

    /// A oneway call to a function with `async:` in its manifest becomes a task: the message (without a multiplexing
    /// prefix, in the caller's protocol) is stored durably and later sent to an instance in its own transport. The
    /// caller gets no reply, as for any oneway call; THeader `apus-idempotency-key` and `apus-priority` apply.
    private func submitTask(_ call: Call, method: String, version: FunctionVersion, pinnedVersion: Int?, submitter: any AsyncTaskSubmitter) {
        var submission = TaskSubmission(
            function: version.function, pinnedVersion: pinnedVersion, kind: .thrift,
            method: method, path: method, contentType: "application/x-thrift; protocol=\(call.frame.envelope.encoding.rawValue)",
            payload: Array(call.outbound.readableBytesView), requestID: call.requestID)
        submission.idempotencyKey = call.frame.headers["apus-idempotency-key"]
        submission.priority = call.frame.headers["apus-priority"].flatMap { Int($0) }.map { min(1000, max(-1000, $0)) } ?? 0
        finish(call)
        let logger = shared.logger
        let requestID = call.requestID
        Task {
            do throws(ApusError) {
                let receipt = try await submitter.submit(submission)
                logger.debug("thrift oneway call became a task", metadata: ["requestID": "\(requestID)", "task": "\(receipt.id)"])
            } catch {
                logger.warning("thrift oneway call could not become a task", metadata: [
                    "requestID": "\(requestID)", "function": "\(submission.function)", "code": "\(error.code)", "reason": "\(error.message)",
                ])
            }
        }
    }

    /// Timeouts a caller may send: TTHeader RPC timeout (int key 12, ms), THeader `client_timeout` or
    /// `apus-timeout-ms` (ms).
    static func headerTimeout(_ frame: ThriftFrame) -> Duration? {
        let text = frame.intHeaders[12] ?? frame.headers["apus-timeout-ms"] ?? frame.headers["client_timeout"]
        guard let text, let milliseconds = Int64(text), milliseconds > 0 else { return nil }
        return .milliseconds(milliseconds)
    }

    private var waiting: [String: Call] = [:]

    private func acquireSlot(_ call: Call) {
        guard let pool = call.pool else { return }
        switch pool.acquire(requestID: call.requestID, deadline: call.deadline, waiter: slotWaiter!, shard: shared.shardKey(for: context.eventLoop)) {
        case .leased(let lease):
            call.lease = lease
            send(call)
        case .failed(let error):
            fail(call, .internalError, error)
        case .queued:
            call.queued = true
            waiting[call.requestID] = call
        }
    }

    func slotDecided(requestID: String, _ result: Result<InstancePool.Lease, ApusError>) {
        guard let call = waiting.removeValue(forKey: requestID), !call.done else {
            if case .success(let lease) = result {
                // The call ended meanwhile: find its pool through the catalog-independent route of the lease.
                orphanRelease(lease, requestID: requestID)
            }
            return
        }
        call.queued = false
        switch result {
        case .success(let lease):
            call.lease = lease
            send(call)
        case .failure(let error):
            fail(call, .internalError, error)
        }
    }

    /// Leases that arrive for calls that already ended go back to their pool.
    private var endedWhileQueued: [String: InstancePool] = [:]

    private func orphanRelease(_ lease: InstancePool.Lease, requestID: String) {
        endedWhileQueued.removeValue(forKey: requestID)?.release(lease)
    }

    private func send(_ call: Call) {
        guard let lease = call.lease, let version = call.version, let thrift = version.manifest.thrift else { return }
        let requestID = call.requestID
        shared.instanceThriftPool(for: context.eventLoop).connection(
            instanceID: lease.instanceID, endpoint: lease.endpoint, transport: ThriftTransport(thrift.transport),
            maxFrameSize: shared.configuration.thriftMaxFrameBytes
        ) { [self] result in
            guard !call.done, call.requestID == requestID else {
                if case .success(let connection) = result { shared.instanceThriftPool(for: context.eventLoop).release(connection) }
                return
            }
            switch result {
            case .success(let connection):
                call.upstream = connection
                connection.call = call
                connection.owner = self
                var headers: [(String, String)] = [("apus-request-id", call.requestID)]
                if let timeout = Self.headerTimeout(call.frame) { headers.append(("client_timeout", String(timeout.milliseconds))) }
                let framed = ThriftFraming.encode(
                    call.outbound, transport: connection.transport, encoding: ThriftEncoding(thrift.protocol),
                    headerSeqid: call.frame.headerSeqid, headers: connection.transport == .theader ? headers : [],
                    allocator: context.channel.allocator)
                if call.isOneway {
                    // No reply will come: the slot is free once the bytes are written.
                    call.upstream = nil
                    connection.call = nil
                    connection.channel.writeAndFlush(framed).assumeIsolated().whenComplete { [self] result in
                        if case .success = result {
                            call.outcome = "oneway"
                            shared.instanceThriftPool(for: context.eventLoop).release(connection)
                        } else {
                            call.outcome = ApusError.Code.instanceError.name
                            connection.channel.close(promise: nil)
                            log(call, code: "instance_error", reason: "oneway call could not be delivered to the instance")
                        }
                        finish(call)
                    }
                } else {
                    connection.channel.writeAndFlush(framed, promise: nil)
                }
            case .failure(let error):
                call.pool?.reportUnreachable(lease)
                call.lease = nil
                if call.retried {
                    fail(call, .internalError, ApusError(.unavailable, "cannot connect to instance \(lease.instanceID): \(error)"))
                } else {
                    call.retried = true
                    acquireSlot(call)
                }
            }
        }
    }

    /// The instance answered `call`.
    func instanceReplied(_ call: Call, frame: ThriftFrame, on connection: InstanceThriftConnection) {
        guard !call.done else { return }
        guard frame.envelope.seqid == call.frame.envelope.seqid else {
            connection.channel.close(promise: nil)
            fail(call, .internalError, ApusError(.instanceError, "instance replied with seqid \(frame.envelope.seqid) to call seqid \(call.frame.envelope.seqid)"))
            return
        }
        connection.call = nil
        call.upstream = nil
        call.outcome = frame.envelope.type == .exception ? "exception" : "reply"
        shared.instanceThriftPool(for: context.eventLoop).release(connection)
        // The reply passes as the instance wrote it: named by the bare method, as TMultiplexedProcessor's replies
        // are (a multiplexed caller such as Go's TStandardClient checks the reply's name against the bare method).
        complete(call, with: frame.message, headers: [("apus-request-id", call.requestID)])
    }

    func instanceFailed(_ call: Call, reason: String) {
        guard !call.done else { return }
        call.upstream = nil
        shared.settleInstanceFailure(reason, instanceID: call.lease?.instanceID, on: context.eventLoop) { [self] error, _ in
            fail(call, .internalError, error)  // a no-op when the call ended meanwhile (deadline, client gone)
        }
    }

    // MARK: endings

    private func fail(_ call: Call, _ type: ThriftWire.ApplicationError, _ error: ApusError) {
        guard !call.done else { return }
        call.outcome = error.code.name
        log(call, code: error.code.name, reason: error.message)
        if call.isOneway {
            finish(call)  // oneway calls never get a reply, not even an error
            return
        }
        let envelope = call.frame.envelope
        let message = ThriftWire.applicationException(
            name: envelope.methodName, seqid: envelope.seqid, encoding: envelope.encoding, oldBinary: envelope.oldBinary,
            error: type, message: error.message)
        complete(call, with: message, headers: [("apus-request-id", call.requestID), ("apus-error-code", String(error.code.httpStatus)),
                                                 ("apus-error", error.code.name)])
    }

    private func complete(_ call: Call, with message: ByteBuffer, headers: [(String, String)]) {
        call.reply = ThriftFraming.encode(
            message, transport: call.frame.transport, encoding: call.frame.envelope.encoding,
            headerSeqid: call.frame.headerSeqid,
            headers: call.frame.transport == .buffered || call.frame.transport == .framed ? [] : headers,
            allocator: context.channel.allocator)
        finish(call)
        flushReplies()
    }

    /// Replies leave in the order their calls arrived.
    private func flushReplies() {
        guard !closed else { return }
        var wrote = false
        while let first = calls.first, first.done {
            calls.removeFirst()
            if let reply = first.reply {
                context.write(wrapOutboundOut(reply), promise: nil)
                wrote = true
            }
        }
        if wrote { context.flush() }
        updateReading()
        if draining && calls.isEmpty { context.close(promise: nil) }
    }

    /// Gives back what the call holds.
    private func finish(_ call: Call) {
        guard !call.done else { return }
        call.done = true
        call.pool?.metrics.recordRequest(protocol: "thrift", code: call.outcome ?? "client_closed", since: call.arrivedAt)
        if call.deadlineSlot >= 0 { shared.callDeadlines(for: context.eventLoop).remove(call) }
        call.onDeadline = nil
        if let lease = call.lease {
            call.pool?.release(lease)
            call.lease = nil
        } else if call.queued, let pool = call.pool {
            waiting[call.requestID] = nil
            if !pool.cancel(requestID: call.requestID) { endedWhileQueued[call.requestID] = pool }
        }
        if let upstream = call.upstream {
            // A reply may still come on this connection: it cannot serve another call.
            upstream.call = nil
            upstream.channel.close(promise: nil)
            call.upstream = nil
        }
    }

    /// The client went away: nothing to answer, but the call's resources go back.
    private func abandon(_ call: Call) {
        finish(call)
    }

    private func log(_ call: Call, code: String, reason: String) {
        shared.logger.info("thrift call failed", metadata: [
            "requestID": "\(call.requestID)", "function": "\(call.function ?? "-")",
            "version": "\(call.version.map { String($0.number) } ?? "-")", "method": "\(call.frame.envelope.name)",
            "code": "\(code)", "reason": "\(reason)",
        ])
    }
}

extension ThriftTransport {
    init(_ transport: FunctionManifest.ThriftSettings.Transport) {
        switch transport {
        case .framed: self = .framed
        case .buffered: self = .buffered
        case .header: self = .theader
        }
    }
}

/// Pooled connections from one event loop to Thrift instances: one call at a time per connection.
final class InstanceThriftPool: @unchecked Sendable {
    let eventLoop: any EventLoop
    private let idle = IdleConnections<InstanceThriftConnection>(maxPerInstance: 64)

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func connection(
        instanceID: String, endpoint: InstanceEndpoint, transport: ThriftTransport, maxFrameSize: Int,
        _ completion: @escaping (Result<InstanceThriftConnection, any Error>) -> Void
    ) {
        eventLoop.assertInEventLoop()
        if let connection = idle.take(instanceID: instanceID, endpoint: endpoint, fits: { $0.transport == transport }) {
            completion(.success(connection))
            return
        }
        let handler = InstanceThriftHandler()
        let bound = NIOLoopBound(handler, eventLoop: eventLoop)
        connectToInstance(endpoint: endpoint, on: eventLoop) { channel in
            try channel.pipeline.syncOperations.addHandler(
                ByteToMessageHandler(ThriftFrameDecoder(maxFrameSize: maxFrameSize, expected: transport)))
            try channel.pipeline.syncOperations.addHandler(bound.value)
        }
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    let connection = InstanceThriftConnection(channel: channel, instanceID: instanceID, endpoint: endpoint, transport: transport)
                    bound.value.connection = connection
                    completion(.success(connection))
                case .failure(let error):
                    completion(.failure(error))
                }
            }
    }

    func release(_ connection: InstanceThriftConnection) {
        connection.call = nil
        connection.owner = nil
        idle.put(connection)
    }

    func closeAll() {
        idle.closeAll()
    }
}

final class InstanceThriftConnection: PooledInstanceConnection {
    let channel: any Channel
    let instanceID: String
    let endpoint: InstanceEndpoint
    var watchedWhileIdle = false
    let transport: ThriftTransport
    /// The call waiting for a reply on this connection, and the client connection it belongs to.
    var call: ThriftEdgeConnection.Call?
    weak var owner: ThriftEdgeConnection?

    init(channel: any Channel, instanceID: String, endpoint: InstanceEndpoint, transport: ThriftTransport) {
        self.channel = channel
        self.instanceID = instanceID
        self.endpoint = endpoint
        self.transport = transport
    }
}

private final class InstanceThriftHandler: ChannelInboundHandler {
    typealias InboundIn = ThriftFrame

    var connection: InstanceThriftConnection?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard let connection, let call = connection.call, let owner = connection.owner else {
            context.close(promise: nil)  // a reply nobody waits for: this connection is out of step
            return
        }
        owner.instanceReplied(call, frame: frame, on: connection)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let connection, let call = connection.call, let owner = connection.owner {
            connection.call = nil
            owner.instanceFailed(call, reason: "instance \(connection.instanceID) closed the connection before replying")
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let connection, let call = connection.call, let owner = connection.owner {
            connection.call = nil
            owner.instanceFailed(call, reason: "instance \(connection.instanceID) sent a malformed reply: \(error)")
        }
        context.close(promise: nil)
    }
}

extension ThriftEncoding {
    /// The wire encoding of a function's `thrift.protocol`.
    init(_ manifest: FunctionManifest.ThriftSettings.Encoding) {
        switch manifest {
        case .binary: self = .binary
        case .compact: self = .compact
        }
    }
}
