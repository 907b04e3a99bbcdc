import NIOCore
import NIOHTTP2
import Testing

@testable import ApusGateway

@Suite("inbound connection window")
struct InboundConnectionWindowTests {
    @Test func opensOnceAndGivesBackAtHalf() {
        var window = InboundConnectionWindow(target: 1 << 20)
        #expect(window.openingIncrement == (1 << 20) - 65_535)
        #expect(InboundConnectionWindow(target: 65_535).openingIncrement == nil)
        let frame = HTTP2Frame.FramePayload.Data(data: .byteBuffer(ByteBuffer(repeating: 0, count: 200_000)), paddingBytes: 9)
        #expect(frame.flowControlledLength == 200_010)
        #expect(window.received(frame) == nil)
        #expect(window.received(frame) == nil)
        #expect(window.received(frame) == 600_030, "half of 1 MiB taken: all of it comes back at once")
        #expect(window.received(frame) == nil, "counting starts again")
    }
}
