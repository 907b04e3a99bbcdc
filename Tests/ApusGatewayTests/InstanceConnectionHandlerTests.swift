import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing

@testable import ApusGateway

/// `InstanceConnectionHandler` against a real `NIOHTTP2Handler` in server mode standing in for the instance: the two
/// embedded channels exchange bytes, the server side records the frames it gets and answers by hand.
@Suite("Instance connection handler")
struct InstanceConnectionHandlerTests {
    final class Owner: InstanceStreamOwner {
        var frames: [HTTP2Frame.FramePayload] = []
        var failures: [String] = []
        var wakeUps = 0
        var readCompletes = 0
        var clientWritable = true

        func instanceFrame(_ payload: HTTP2Frame.FramePayload) { frames.append(payload) }
        func instanceReadComplete() { readCompletes += 1 }
        func instanceStreamWritable() { wakeUps += 1 }
        func instanceStreamFailed(_ reason: String) { failures.append(reason) }
    }

    final class FrameRecorder: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame
        var frames: [HTTP2Frame] = []

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            frames.append(unwrapInboundIn(data))
        }
    }

    final class Pair {
        let client = EmbeddedChannel()
        let server = EmbeddedChannel()
        let handler: InstanceConnectionHandler
        let recorder = FrameRecorder()
        var ready = false
        var draining = false
        var closed = false

        init(streamWindow: Int = 1 << 20, serverInitialWindow: Int = 65_535) throws {
            handler = InstanceConnectionHandler(streamWindow: streamWindow, connectionWindow: 8 << 20)
            var configuration = NIOHTTP2Handler.ConnectionConfiguration()
            configuration.initialSettings = [HTTP2Setting(parameter: .initialWindowSize, value: streamWindow)]
            configuration.headerBlockValidation = .disabled
            try client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, connectionConfiguration: configuration))
            try client.pipeline.syncOperations.addHandler(handler)
            handler.onReady = { [unowned self] _ in ready = true }
            handler.onDraining = { [unowned self] in draining = true }
            handler.onClosed = { [unowned self] in closed = true }
            try server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(
                mode: .server,
                initialSettings: [HTTP2Setting(parameter: .initialWindowSize, value: serverInitialWindow)]))
            try server.pipeline.syncOperations.addHandler(recorder)
            let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
            try client.connect(to: address).wait()
            try server.connect(to: address).wait()
            try exchange()
        }

        /// Moves bytes both ways until neither side has anything more to say.
        func exchange() throws {
            try pumpBytes(between: client, and: server)
        }

        func serverSend(_ streamID: HTTP2StreamID, _ payload: HTTP2Frame.FramePayload) throws {
            try server.writeAndFlush(HTTP2Frame(streamID: streamID, payload: payload)).wait()
            try exchange()
        }

        func serverFrames(on streamID: HTTP2StreamID) -> [HTTP2Frame.FramePayload] {
            recorder.frames.filter { $0.streamID == streamID }.map(\.payload)
        }
    }

    static func request() -> HPACKHeaders {
        [":method": "POST", ":scheme": "http", ":path": "/echo.Echo/Get", ":authority": "localhost",
         "content-type": "application/grpc", "te": "trailers"]
    }

    static func data(_ count: Int, endStream: Bool = false) -> HTTP2Frame.FramePayload {
        .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: count)), endStream: endStream))
    }

    @Test func unaryCallRelaysFramesAndEndsWithoutReset() throws {
        let pair = try Pair()
        #expect(pair.ready)
        // The connection window is opened at once.
        #expect(pair.recorder.frames.contains { $0.streamID == .rootStream && $0.payload.isWindowUpdate })
        let owner = Owner()
        let first = try #require(pair.handler.startStream(owner: owner, headers: Self.request(), endStream: false))
        pair.handler.write(Self.data(12, endStream: true), on: first)
        pair.handler.flush()
        try pair.exchange()
        #expect(first == 1)
        #expect(pair.serverFrames(on: first).count == 2)

        try pair.serverSend(first, .headers(.init(headers: [":status": "200", "content-type": "application/grpc"])))
        try pair.serverSend(first, Self.data(31))
        try pair.serverSend(first, .headers(.init(headers: ["grpc-status": "0"], endStream: true)))
        #expect(owner.frames.count == 3)
        // A read-complete after each burst that brought the owner frames (the last one too).
        #expect(owner.readCompletes == 3)
        pair.handler.release(first, reset: false, endRequest: false)
        try pair.exchange()
        #expect(!pair.recorder.frames.contains { $0.payload.isReset })
        #expect(pair.handler.openStreams == 0)

        let second = try #require(pair.handler.startStream(owner: Owner(), headers: Self.request(), endStream: true))
        #expect(second == 3)
    }

    @Test func cancelledCallResetsTheOpenStream() throws {
        let pair = try Pair()
        let owner = Owner()
        let streamID = try #require(pair.handler.startStream(owner: owner, headers: Self.request(), endStream: false))
        pair.handler.flush()
        try pair.exchange()
        pair.handler.release(streamID, reset: true, endRequest: false)
        try pair.exchange()
        guard case .rstStream(let code) = pair.serverFrames(on: streamID).last else {
            Issue.record("no RST_STREAM: \(pair.serverFrames(on: streamID))")
            return
        }
        #expect(code == .cancel)
        #expect(owner.failures.isEmpty)
    }

    @Test func answeredCallWithOpenRequestIsHalfClosedNotReset() throws {
        let pair = try Pair()
        let owner = Owner()
        let streamID = try #require(pair.handler.startStream(owner: owner, headers: Self.request(), endStream: false))
        pair.handler.flush()
        try pair.exchange()
        try pair.serverSend(streamID, .headers(.init(headers: [":status": "200", "grpc-status": "0"], endStream: true)))
        pair.handler.release(streamID, reset: false, endRequest: true)
        try pair.exchange()
        let frames = pair.serverFrames(on: streamID)
        #expect(!frames.contains { $0.isReset })
        guard case .data(let last) = frames.last else {
            Issue.record("expected an empty DATA with END_STREAM: \(frames)")
            return
        }
        #expect(last.endStream)
    }

    @Test func requestDataFollowsTheInstanceWindow() throws {
        let pair = try Pair(serverInitialWindow: 100)
        let owner = Owner()
        let streamID = try #require(pair.handler.startStream(owner: owner, headers: Self.request(), endStream: false))
        pair.handler.write(Self.data(60), on: streamID)
        #expect(pair.handler.canSend(on: streamID))
        pair.handler.write(Self.data(60), on: streamID)
        #expect(!pair.handler.canSend(on: streamID))
        pair.handler.flush()
        try pair.exchange()
        #expect(owner.wakeUps == 0)
        try pair.serverSend(streamID, .windowUpdate(windowSizeIncrement: 10))
        #expect(owner.wakeUps == 0)  // 100 + 10 - 120: still no room
        try pair.serverSend(streamID, .windowUpdate(windowSizeIncrement: 100))
        #expect(owner.wakeUps == 1)
        #expect(pair.handler.canSend(on: streamID))
    }

    @Test func responseWindowIsGivenBackAsTheClientTakesBytes() throws {
        let pair = try Pair(streamWindow: 1000)
        let owner = Owner()
        let streamID = try #require(pair.handler.startStream(owner: owner, headers: Self.request(), endStream: true))
        pair.handler.flush()
        try pair.exchange()
        try pair.serverSend(streamID, .headers(.init(headers: [":status": "200"])))
        owner.clientWritable = false
        try pair.serverSend(streamID, Self.data(600))
        #expect(!pair.serverFrames(on: streamID).contains { $0.isWindowUpdate })
        owner.clientWritable = true
        pair.handler.clientTookBytes(on: streamID)
        pair.handler.flush()
        try pair.exchange()
        guard case .windowUpdate(let increment) = pair.serverFrames(on: streamID).last else {
            Issue.record("no WINDOW_UPDATE: \(pair.serverFrames(on: streamID))")
            return
        }
        #expect(increment == 600)
    }

    @Test func goAwayStopsNewStreamsAndFailsRefusedOnes() throws {
        let pair = try Pair()
        let kept = Owner()
        let refused = Owner()
        let keptID = try #require(pair.handler.startStream(owner: kept, headers: Self.request(), endStream: true))
        let refusedID = try #require(pair.handler.startStream(owner: refused, headers: Self.request(), endStream: true))
        pair.handler.flush()
        try pair.exchange()
        try pair.serverSend(.rootStream, .goAway(lastStreamID: keptID, errorCode: .noError, opaqueData: nil))
        #expect(pair.draining)
        #expect(pair.handler.startStream(owner: Owner(), headers: Self.request(), endStream: true) == nil)
        #expect(refused.failures.count == 1)
        #expect(kept.failures.isEmpty)
        _ = refusedID
        try pair.serverSend(keptID, .headers(.init(headers: [":status": "200", "grpc-status": "0"], endStream: true)))
        #expect(kept.frames.count == 1)
        pair.handler.release(keptID, reset: false, endRequest: false)
        // The last stream done, the draining connection closes.
        #expect(pair.closed)
    }

    @Test func lostConnectionFailsEveryStream() throws {
        let pair = try Pair()
        let owners = [Owner(), Owner()]
        for owner in owners { _ = pair.handler.startStream(owner: owner, headers: Self.request(), endStream: true) }
        pair.handler.flush()
        try pair.exchange()
        pair.client.pipeline.fireChannelInactive()
        #expect(owners.allSatisfy { $0.failures.count == 1 })
        #expect(pair.closed)
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
}
