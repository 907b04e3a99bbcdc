import ApusCore
import ApusWire
import CApusShims
import Glibc
import NIOCore

/// One keep-alive HTTP/1.1 connection from a reactor loop to an instance: writes the request the client
/// connection composed in `out`, reads the response with the minimal codec and passes it to the client as it
/// arrives. Reading pauses while the client has too much unwritten (a slow client slows the instance).
final class ReactorUpstream: ReactorSocket {
    let instanceID: String
    let endpoint: InstanceEndpoint
    /// Request bytes not yet taken by the socket.
    var out: ByteBuffer
    private var inbound: ByteBuffer
    private var reader = ResponseReader()
    private(set) var isConnected = false
    private var closed = false
    private var readable = false
    private(set) var isPaused = false
    /// Whether this connection already served a request (a failure on reuse may be retried).
    private(set) var servedBefore = false
    var inIdlePool = false
    private var client: ReactorClient?

    init(fd: Int32, loop: ReactorLoop, instanceID: String, endpoint: InstanceEndpoint) {
        self.instanceID = instanceID
        self.endpoint = endpoint
        out = loop.allocator.buffer(capacity: 0)
        inbound = loop.allocator.buffer(capacity: 0)
        super.init(fd: fd, loop: loop)
    }

    /// Open, and not known to be closing.
    var isUsable: Bool { !closed && !readable }

    func begin(client: ReactorClient, requestWasHEAD: Bool) {
        self.client = client
        reader.begin(requestWasHEAD: requestWasHEAD)
        isPaused = false
        out.clear()
        inbound.clear()
    }

    override func handle(_ events: UInt32) {
        if !isConnected {
            if events & (APUS_EV_ERR | APUS_EV_HUP) != 0 {
                connectFailed()
                return
            }
            guard events & APUS_EV_OUT != 0 else { return }
            isConnected = true
            flushNow()
            client?.upstreamConnected()
        }
        if events & (APUS_EV_IN | APUS_EV_RDHUP | APUS_EV_HUP | APUS_EV_ERR) != 0 { readable = true }
        if events & APUS_EV_OUT != 0, out.readableBytes > 0 { flushNow() }
        if readable && !isPaused { readAvailable() }
    }

    private func connectFailed() {
        let client = self.client
        self.client = nil
        close()
        client?.upstreamConnectFailed()
    }

    /// Writes what the socket takes of the request (once connected).
    override func flushNow() {
        guard isConnected, !closed else { return }
        let hadBacklog = out.readableBytes > ReactorClient.maxBufferedAhead
        guard SocketIO.flush(fd, &out) else {
            fail("cannot write to the instance: \(String(cString: strerror(errno)))", retryable: servedBefore)
            return
        }
        if hadBacklog, out.readableBytes <= ReactorClient.maxBufferedAhead { client?.upstreamDrained() }
    }

    func resume() {
        guard isPaused else { return }
        isPaused = false
        if readable { readAvailable() }
    }

    private func readAvailable() {
        while readable, !isPaused, !closed {
            SocketIO.compact(&inbound)
            switch SocketIO.read(fd, into: &inbound) {
            case .bytes(let drained):
                if drained { readable = false }
                guard consume() else { return }
            case .wouldBlock:
                readable = false
            case .endOfFile, .failed:
                endOfStream()
                return
            }
        }
        client?.flush()
    }

    /// Works through `inbound`. False when the exchange ended (the loop must not read on for it).
    private func consume() -> Bool {
        while true {
            let event = inbound.withUnsafeReadableBytes { reader.next($0) }
            switch event {
            case .needMore:
                guard reader.isInBody, let client else { return true }
                // Body bytes were passed on: write them, and stop reading while the client cannot keep up.
                inbound.discardReadBytes()
                client.flush()
                if client.isBackedUp { isPaused = true }
                return !closed
            case .interim(let head, let length):
                guard let client else { return false }
                inbound.withUnsafeReadableBytes { client.interimResponse($0, head) }
                inbound.moveReaderIndex(forwardBy: length)
            case .head(let head, let length):
                guard let client else { return false }
                inbound.withUnsafeReadableBytes { client.responseHead($0, head) }
                inbound.moveReaderIndex(forwardBy: length)
            case .body(let count):
                guard let client else { return false }
                inbound.readWithUnsafeReadableBytes { bytes in
                    client.responseBody(UnsafeRawBufferPointer(rebasing: bytes.prefix(count)))
                    return count
                }
            case .complete(let reusable):
                return finish(reusable: reusable)
            case .failed(let failure):
                fail(failure.message(from: "instance"), retryable: false)
                return false
            case .unexpectedBytes:
                // Bytes nobody asked for: the connection is out of step.
                loop.removeIdle(self)
                close()
                return false
            }
        }
    }

    private func finish(reusable: Bool) -> Bool {
        servedBefore = true
        inbound.clear()
        let client = self.client
        self.client = nil
        if !reusable { close() }
        client?.responseComplete(reusable: reusable && !closed)
        return false
    }

    private func endOfStream() {
        switch reader.upstreamClosed() {
        case .idle:
            loop.removeIdle(self)
            close()
        case .complete:
            readable = false
            _ = finish(reusable: false)
        case .beforeHead, .midBody:
            fail("instance closed the connection before answering", retryable: servedBefore)
        }
    }

    private func fail(_ reason: String, retryable: Bool) {
        let client = self.client
        self.client = nil
        reader.reset()
        close()
        client?.upstreamFailed(reason, retryable: retryable)
    }

    func close() {
        guard !closed else { return }
        closed = true
        client = nil
        reader.reset()
        loop.close(self)
    }
}
