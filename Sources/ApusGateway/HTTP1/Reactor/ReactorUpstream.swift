import CApusShims
import Glibc
import NIOCore

/// One keep-alive HTTP/1.1 connection from a reactor loop to an instance: writes the request the client
/// connection composed in `out`, reads the response with the minimal codec and passes it to the client as it
/// arrives. Reading pauses while the client has too much unwritten (a slow client slows the instance).
final class ReactorUpstream: ReactorSocket {
    private enum State {
        case idle
        case head(requestWasHEAD: Bool)
        case body(BodyFraming, reusable: Bool)
    }

    let instanceID: String
    let port: Int
    /// Request bytes not yet taken by the socket.
    var out: ByteBuffer
    private var inbound: ByteBuffer
    private var state = State.idle
    private(set) var isConnected = false
    private var closed = false
    private var readable = false
    private(set) var isPaused = false
    /// Whether this connection already served a request (a failure on reuse may be retried).
    private(set) var servedBefore = false
    var inIdlePool = false
    private var client: ReactorClient?
    private static let maxHead = 64 << 10

    init(fd: Int32, loop: ReactorLoop, instanceID: String, port: Int) {
        self.instanceID = instanceID
        self.port = port
        out = loop.allocator.buffer(capacity: 0)
        inbound = loop.allocator.buffer(capacity: 0)
        super.init(fd: fd, loop: loop)
    }

    /// Open, and not known to be closing.
    var isUsable: Bool { !closed && !readable }

    func begin(client: ReactorClient, requestWasHEAD: Bool) {
        self.client = client
        state = .head(requestWasHEAD: requestWasHEAD)
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
            switch state {
            case .idle:
                // Bytes nobody asked for: the connection is out of step.
                loop.removeIdle(self)
                close()
                return false
            case .head(let requestWasHEAD):
                let parsed: (ResponseHead, Int)?? = inbound.withUnsafeReadableBytes { bytes in
                    guard let end = HTTPBytes.endOfHead(bytes) else { return .some(nil) }
                    guard let head = ResponseHead.parse(bytes, headEnd: end, requestWasHEAD: requestWasHEAD) else { return nil }
                    return (head, end)
                }
                guard let parsed else {
                    fail("instance sent a malformed response head", retryable: false)
                    return false
                }
                guard let (head, end) = parsed else {
                    if inbound.readableBytes > Self.maxHead {
                        fail("instance response head exceeds 64 KiB", retryable: false)
                        return false
                    }
                    return true
                }
                guard let client else { return false }
                inbound.withUnsafeReadableBytes { bytes in
                    if (100..<200).contains(head.status) {
                        client.interimResponse(bytes, head)
                    } else {
                        client.responseHead(bytes, head)
                    }
                }
                inbound.moveReaderIndex(forwardBy: end)
                if !(100..<200).contains(head.status) {
                    state = .body(head.framing, reusable: !head.connectionClose)
                }
            case .body(let framing, let reusable):
                guard let client else { return false }
                switch framing {
                case .none:
                    return finish(reusable: reusable && inbound.readableBytes == 0)
                case .length(let remaining):
                    let take = min(remaining, inbound.readableBytes)
                    if take > 0 {
                        inbound.readWithUnsafeReadableBytes { bytes in
                            client.responseBody(UnsafeRawBufferPointer(rebasing: bytes.prefix(take)))
                            return take
                        }
                    }
                    if remaining == take { return finish(reusable: reusable && inbound.readableBytes == 0) }
                    state = .body(.length(remaining: remaining - take), reusable: reusable)
                    return pauseIfBackedUp(client)
                case .chunked(var scanner):
                    let consumed: Int
                    do {
                        consumed = try inbound.withUnsafeReadableBytes { bytes throws(ChunkedBodyScanner.ScanError) in try scanner.scan(bytes) }
                    } catch {
                        fail("instance sent a malformed chunked body", retryable: false)
                        return false
                    }
                    if consumed > 0 {
                        inbound.readWithUnsafeReadableBytes { bytes in
                            client.responseBody(UnsafeRawBufferPointer(rebasing: bytes.prefix(consumed)))
                            return consumed
                        }
                    }
                    if scanner.isDone { return finish(reusable: reusable && inbound.readableBytes == 0) }
                    state = .body(.chunked(scanner), reusable: reusable)
                    return pauseIfBackedUp(client)
                case .untilClose:
                    if inbound.readableBytes > 0 {
                        inbound.readWithUnsafeReadableBytes { bytes in
                            client.responseBody(bytes)
                            return bytes.count
                        }
                    }
                    return pauseIfBackedUp(client)
                }
            }
        }
    }

    /// After passing body bytes on: write them, and stop reading while the client cannot keep up.
    private func pauseIfBackedUp(_ client: ReactorClient) -> Bool {
        inbound.discardReadBytes()
        client.flush()
        if client.isBackedUp { isPaused = true }
        return !closed
    }

    private func finish(reusable: Bool) -> Bool {
        state = .idle
        servedBefore = true
        inbound.clear()
        let client = self.client
        self.client = nil
        if !reusable { close() }
        client?.responseComplete(reusable: reusable && !closed)
        return false
    }

    private func endOfStream() {
        if case .idle = state {
            loop.removeIdle(self)
            close()
            return
        }
        if case .body(.untilClose, _) = state {
            readable = false
            _ = finish(reusable: false)
            return
        }
        fail("instance closed the connection before answering", retryable: servedBefore)
    }

    private func fail(_ reason: String, retryable: Bool) {
        let client = self.client
        self.client = nil
        state = .idle
        close()
        client?.upstreamFailed(reason, retryable: retryable)
    }

    func close() {
        guard !closed else { return }
        closed = true
        client = nil
        state = .idle
        loop.close(self)
    }
}
