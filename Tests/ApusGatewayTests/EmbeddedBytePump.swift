import NIOCore
import NIOEmbedded

/// Moves bytes between two embedded channels wired back to back (each one's outbound is the other's inbound)
/// until neither has anything more to say: a connection without sockets for the HTTP/2 handler tests.
func pumpBytes(between first: EmbeddedChannel, and second: EmbeddedChannel) throws {
    var moved = true
    while moved {
        moved = false
        while let bytes = try first.readOutbound(as: ByteBuffer.self) {
            try second.writeInbound(bytes)
            moved = true
        }
        while let bytes = try second.readOutbound(as: ByteBuffer.self) {
            try first.writeInbound(bytes)
            moved = true
        }
    }
}
