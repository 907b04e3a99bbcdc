import ApusWire
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing

@testable import ApusGateway

/// `EdgeHTTP2Streams` between a real server-mode `NIOHTTP2Handler` and NIO's `HTTP2StreamMultiplexer`, with a
/// client-mode `NIOHTTP2Handler` standing in for the client: the two embedded channels exchange bytes, claimed
/// streams go to test owners, the others to stream channels that record what they get.
@Suite("Edge HTTP/2 streams")
struct EdgeHTTP2StreamsTests {
    final class Owner: EdgeStreamOwner {
        var frames: [HTTP2Frame.FramePayload] = []
        var closed: [HTTP2ErrorCode?] = []
        var wakeUps = 0
        /// Called with each frame (after it is recorded).
        var onFrame: ((HTTP2Frame.FramePayload) -> Void)?

        func clientFrame(_ payload: HTTP2Frame.FramePayload) {
            frames.append(payload)
            onFrame?(payload)
        }
        func clientStreamWritable() { wakeUps += 1 }
        func clientStreamClosed(reason: HTTP2ErrorCode?) { closed.append(reason) }
        func clientBufferFull() { bufferFull += 1 }
        var bufferFull = 0
    }

    final class FrameRecorder: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame
        var frames: [HTTP2Frame] = []

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            frames.append(unwrapInboundIn(data))
        }
    }

    /// The multiplexer's side: records the payloads of every stream channel it makes.
    final class ChannelStreams: @unchecked Sendable {
        var payloads: [HTTP2Frame.FramePayload] = []
        var channels: [any Channel] = []
    }

    final class PayloadRecorder: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame.FramePayload
        let streams: ChannelStreams

        init(_ streams: ChannelStreams) {
            self.streams = streams
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            streams.payloads.append(unwrapInboundIn(data))
        }
    }

    final class Pair {
        let client = EmbeddedChannel()
        let server = EmbeddedChannel()
        let handler: EdgeHTTP2Streams
        let recorder = FrameRecorder()
        let channelStreams = ChannelStreams()
        var owners: [HTTP2StreamID: Owner] = [:]
        var opened = 0
        var closed = 0

        private init(handler: EdgeHTTP2Streams) {
            self.handler = handler
        }

        static func make(streamWindow: Int = 65_535, clientInitialWindow: Int = 65_535, budget: BufferedBytesBudget? = nil) throws -> Pair {
            var pair: Pair?
            let handler = EdgeHTTP2Streams(
                streamWindow: streamWindow, connectionWindow: 1 << 20, deferredFlushes: nil,
                onStreamOpened: { pair?.opened += 1 }, onStreamClosed: { pair?.closed += 1 },
                holdBytes: budget.map { budget in { from, to in budget.update(from: from, to: to) } },
                makeOwner: { _, streamID, _ in
                    let owner = Owner()
                    pair?.owners[streamID] = owner
                    return owner
                })
            pair = Pair(handler: handler)
            try pair!.setUp(streamWindow: streamWindow, clientInitialWindow: clientInitialWindow)
            return pair!
        }

        private func setUp(streamWindow: Int, clientInitialWindow: Int) throws {
            try server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(
                mode: .server, initialSettings: [HTTP2Setting(parameter: .initialWindowSize, value: streamWindow)]))
            try server.pipeline.syncOperations.addHandler(handler)
            let channelStreams = self.channelStreams
            try server.pipeline.syncOperations.addHandler(HTTP2StreamMultiplexer(
                mode: .server, channel: server, targetWindowSize: streamWindow,
                inboundStreamInitializer: { stream in
                    stream.eventLoop.makeCompletedFuture {
                        channelStreams.channels.append(stream)
                        try stream.pipeline.syncOperations.addHandler(PayloadRecorder(channelStreams))
                    }
                }))
            try client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(
                mode: .client, initialSettings: [HTTP2Setting(parameter: .initialWindowSize, value: clientInitialWindow)]))
            try client.pipeline.syncOperations.addHandler(recorder)
            let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
            try server.connect(to: address).wait()
            try client.connect(to: address).wait()
            try exchange()
        }

        /// Moves bytes both ways until neither side has anything more to say.
        func exchange() throws {
            try pumpBytes(between: client, and: server)
        }

        func clientSend(_ streamID: HTTP2StreamID, _ payload: HTTP2Frame.FramePayload) throws {
            try client.writeAndFlush(HTTP2Frame(streamID: streamID, payload: payload)).wait()
            try exchange()
        }

        func clientFrames(on streamID: HTTP2StreamID) -> [HTTP2Frame.FramePayload] {
            recorder.frames.filter { $0.streamID == streamID }.map(\.payload)
        }
    }

    static func request(path: String = "/echo.Echo/Get", contentType: String = "application/grpc") -> HPACKHeaders {
        [":method": "POST", ":scheme": "http", ":path": path, ":authority": "localhost",
         "content-type": contentType, "te": "trailers"]
    }

    static func data(_ count: Int, endStream: Bool = false) -> HTTP2Frame.FramePayload {
        .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: count)), endStream: endStream))
    }

    static let responseHeaders: HPACKHeaders = [":status": "200", "content-type": "application/grpc"]

    @Test func onlyPlainGRPCCallsAreClaimed() {
        #expect(EdgeHTTP2Streams.isRelayedGRPCCall(Self.request()))
        #expect(EdgeHTTP2Streams.isRelayedGRPCCall(Self.request(contentType: "application/grpc+proto")))
        #expect(!EdgeHTTP2Streams.isRelayedGRPCCall(Self.request(contentType: "text/plain")))
        #expect(!EdgeHTTP2Streams.isRelayedGRPCCall(Self.request(path: "/grpc.health.v1.Health/Check")))
        #expect(!EdgeHTTP2Streams.isRelayedGRPCCall(Self.request(path: "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")))
        #expect(!EdgeHTTP2Streams.isRelayedGRPCCall([":method": "GET", ":path": "/f/", ":scheme": "http", ":authority": "h"]))
    }

    @Test func mixedStreamsOnOneConnection() throws {
        let pair = try Pair.make()
        // The connection window is opened at once.
        #expect(pair.recorder.frames.contains { $0.streamID == .rootStream && $0.payload.isWindowUpdate })
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        try pair.clientSend(3, .headers(.init(headers: Self.request(contentType: "text/plain"), endStream: true)))
        try pair.clientSend(5, .headers(.init(headers: Self.request(path: "/grpc.health.v1.Health/Check"))))
        try pair.clientSend(1, Self.data(12, endStream: true))
        try pair.clientSend(5, Self.data(5, endStream: true))

        let owner = try #require(pair.owners[1])
        #expect(pair.owners.count == 1, "only the gRPC call to a function is claimed")
        #expect(owner.frames.count == 2)
        #expect(pair.opened == 1)
        #expect(pair.channelStreams.channels.count == 2, "HTTP and health get stream channels")
        #expect(pair.channelStreams.payloads.count == 3)

        // The claimed call answers with frames written on the connection.
        pair.handler.write(.headers(.init(headers: Self.responseHeaders)), on: 1)
        pair.handler.write(Self.data(7), on: 1)
        pair.handler.write(.headers(.init(headers: ["grpc-status": "0"], endStream: true)), on: 1)
        pair.handler.flush()
        try pair.exchange()
        #expect(pair.clientFrames(on: 1).count == 3)
        #expect(owner.closed == [nil], "the stream closed once both sides ended")
        #expect(pair.closed == 1)
        #expect(pair.handler.claimedStreams == 0)
        pair.handler.release(1, responseEnded: true)
        try pair.exchange()
        #expect(!pair.clientFrames(on: 1).contains { $0.isReset })

        // The stream channels answer too, on the same connection.
        let http = pair.channelStreams.channels[0]
        try http.writeAndFlush(HTTP2Frame.FramePayload.headers(.init(headers: [":status": "204"], endStream: true))).wait()
        try pair.exchange()
        #expect(pair.clientFrames(on: 3).count == 1)
    }

    @Test func clientResetReachesTheOwner() throws {
        let pair = try Pair.make()
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        try pair.clientSend(1, Self.data(10))
        try pair.clientSend(1, .rstStream(.cancel))
        let owner = try #require(pair.owners[1])
        #expect(owner.closed == [.cancel])
        #expect(pair.opened == 1 && pair.closed == 1)
        #expect(pair.handler.claimedStreams == 0)
        // Writes after the reset go nowhere.
        #expect(!pair.handler.write(Self.data(3), on: 1))
    }

    @Test func releaseResetsAStreamTheClientIsStillSending() throws {
        let pair = try Pair.make()
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        try pair.clientSend(3, .headers(.init(headers: Self.request())))
        // Cut short: RST_STREAM(CANCEL).
        pair.handler.release(1, responseEnded: false)
        // Complete while the client still sends: RST_STREAM(NO_ERROR) after the trailers.
        pair.handler.write(.headers(.init(headers: [":status": "200", "grpc-status": "0"], endStream: true)), on: 3)
        pair.handler.release(3, responseEnded: true)
        try pair.exchange()
        #expect(pair.clientFrames(on: 1).last.map { $0.resetCode == .cancel } == true)
        #expect(pair.clientFrames(on: 3).last.map { $0.resetCode == .noError } == true)
        #expect(pair.owners[1]!.closed.isEmpty && pair.owners[3]!.closed.isEmpty, "released owners are not called back")
        // Frames still in flight from the client are dropped, not passed to the multiplexer.
        #expect(pair.handler.claimedStreams == 0)
        #expect(pair.channelStreams.channels.isEmpty)
    }

    @Test func requestWindowIsGivenBackOnlyAsTheOwnerReads() throws {
        let pair = try Pair.make(streamWindow: 65_535)
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        pair.handler.setReading(false, on: 1)
        let owner = try #require(pair.owners[1])
        for _ in 0..<4 { try pair.clientSend(1, Self.data(16_000)) }
        #expect(owner.frames.count == 1, "DATA waits while the owner does not read")
        #expect(!pair.recorder.frames.contains { $0.streamID == 1 && $0.payload.isWindowUpdate })

        pair.handler.setReading(true, on: 1)
        try pair.exchange()
        #expect(owner.frames.count == 5)
        let given = pair.recorder.frames.filter { $0.streamID == 1 }.compactMap(\.payload.windowIncrement).reduce(0, +)
        #expect(given == 48_000, "the window comes back once half of it was read (16,000 bytes are not yet due)")

        // An owner that stops reading in the middle of the waiting frames gets no more of them.
        pair.handler.setReading(false, on: 1)
        for _ in 0..<3 { try pair.clientSend(1, Self.data(1_000)) }
        owner.onFrame = { _ in pair.handler.setReading(false, on: 1) }
        pair.handler.setReading(true, on: 1)
        #expect(owner.frames.count == 6)
        owner.onFrame = nil
        pair.handler.setReading(true, on: 1)
        #expect(owner.frames.count == 8)
    }

    @Test func waitingRequestBytesCountInTheGatewaysBudget() throws {
        let budget = BufferedBytesBudget(limit: 40_000)
        let pair = try Pair.make(streamWindow: 65_535, budget: budget)
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        try pair.clientSend(3, .headers(.init(headers: Self.request())))
        pair.handler.setReading(false, on: 1)
        pair.handler.setReading(false, on: 3)
        let first = try #require(pair.owners[1]), second = try #require(pair.owners[3])
        for _ in 0..<2 { try pair.clientSend(1, Self.data(16_000)) }
        #expect(budget.current == 32_000, "DATA waiting here is counted")
        try pair.clientSend(3, Self.data(16_000))
        #expect(second.bufferFull == 1, "past the limit the frame is dropped and its owner told")
        #expect(first.bufferFull == 0 && budget.current == 32_000)

        pair.handler.setReading(true, on: 1)
        #expect(first.frames.count == 3 && budget.current == 0, "handed over: no longer held here")
        try pair.clientSend(3, Self.data(8_000))
        #expect(budget.current == 8_000)
        pair.handler.release(3, responseEnded: false)
        #expect(budget.current == 0, "a released stream's waiting bytes are given back")
    }

    @Test func responseFollowsTheClientsWindow() throws {
        let pair = try Pair.make(clientInitialWindow: 100)
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        let owner = try #require(pair.owners[1])
        pair.handler.write(.headers(.init(headers: Self.responseHeaders)), on: 1)
        pair.handler.write(Self.data(5_000), on: 1)
        #expect(pair.handler.isWritable(1), "5,000 bytes held stay below the high watermark")
        pair.handler.write(Self.data(15_000), on: 1)
        pair.handler.flush()
        try pair.exchange()
        #expect(!pair.handler.isWritable(1), "19,900 bytes held: the window took 100")
        #expect(pair.clientFrames(on: 1).compactMap(\.dataLength).reduce(0, +) == 100, "NIO holds what the window does not cover")

        try pair.clientSend(1, .windowUpdate(windowSizeIncrement: 10_000))
        #expect(owner.wakeUps == 0, "9,900 bytes still held")
        try pair.clientSend(1, .windowUpdate(windowSizeIncrement: 10_000))
        #expect(owner.wakeUps == 1)
        #expect(pair.handler.isWritable(1))
        #expect(pair.clientFrames(on: 1).compactMap(\.dataLength).reduce(0, +) == 20_000)

        // A larger initial window from new SETTINGS lets NIO send what it held.
        pair.handler.write(Self.data(20_000), on: 1)
        pair.handler.flush()
        try pair.exchange()
        #expect(!pair.handler.isWritable(1))
        try pair.clientSend(.rootStream, .settings(.settings([HTTP2Setting(parameter: .initialWindowSize, value: 40_000)])))
        #expect(pair.clientFrames(on: 1).compactMap(\.dataLength).reduce(0, +) == 40_000)
        #expect(owner.wakeUps == 2)
    }

    @Test func responseFollowsTheConnectionWindowToo() throws {
        // The client's stream windows are large, its connection window is the default 65,535: what the
        // connection window does not cover is held by NIO and counts against the stream.
        let pair = try Pair.make(clientInitialWindow: 1 << 20)
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        let owner = try #require(pair.owners[1])
        pair.handler.write(.headers(.init(headers: Self.responseHeaders)), on: 1)
        pair.handler.write(Self.data(80_000), on: 1)
        pair.handler.flush()
        try pair.exchange()
        #expect(!pair.handler.isWritable(1))
        try pair.clientSend(.rootStream, .windowUpdate(windowSizeIncrement: 20_000))
        #expect(owner.wakeUps == 1)
    }

    @Test func closedConnectionEndsEveryClaimedCall() throws {
        let pair = try Pair.make()
        try pair.clientSend(1, .headers(.init(headers: Self.request())))
        try pair.clientSend(3, .headers(.init(headers: Self.request())))
        try pair.server.close().wait()
        #expect(pair.owners[1]!.closed.count == 1 && pair.owners[3]!.closed.count == 1)
        #expect(pair.opened == 2 && pair.closed == 2)
    }
}

extension HTTP2Frame.FramePayload {
    fileprivate var isWindowUpdate: Bool {
        if case .windowUpdate = self { return true }
        return false
    }

    fileprivate var isReset: Bool {
        if case .rstStream = self { return true }
        return false
    }

    fileprivate var resetCode: HTTP2ErrorCode? {
        if case .rstStream(let code) = self { return code }
        return nil
    }

    fileprivate var windowIncrement: Int? {
        if case .windowUpdate(let increment) = self { return increment }
        return nil
    }

    fileprivate var dataLength: Int? {
        if case .data(let data) = self { return data.data.readableBytes }
        return nil
    }
}
