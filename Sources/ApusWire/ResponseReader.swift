/// Follows the HTTP/1.1 responses that arrive on one upstream connection (to a function instance, or to a mesh
/// endpoint for the sidecar), one exchange at a time: finds and parses each head, then tracks the body by its
/// framing until the response is complete, and says whether the connection may carry another exchange.
///
/// It never holds bytes. Each `next` call looks at the unread bytes at the front of the caller's buffer and says
/// what they are; the caller passes them on and consumes exactly the bytes the event names before calling again.
/// The gateway's HTTP/1.1 reactor, its SwiftNIO handler and the sidecar's HTTP/1.1 proxy all read responses with
/// it and differ only in how they pass the bytes on.
package struct ResponseReader {
    package enum Event {
        /// Nothing to do until more bytes arrive.
        case needMore
        /// An interim (1xx) response head, the first `length` bytes; the final head follows.
        case interim(ResponseHead, length: Int)
        /// The final response head, the first `length` bytes.
        case head(ResponseHead, length: Int)
        /// The first `count` bytes are body, as framed on the wire (chunk sizes and trailers included).
        case body(count: Int)
        /// The response is over. `reusable`: the upstream did not ask to close and sent nothing beyond the
        /// response, so the connection may carry another exchange. The reader is idle again.
        case complete(reusable: Bool)
        /// The response cannot be read; the connection must be closed.
        case failed(Failure)
        /// Bytes arrived while no exchange was in progress: the connection is out of step and must be closed.
        case unexpectedBytes
    }

    package enum Failure: Equatable {
        case malformedHead
        case headTooLarge
        case malformedChunkedBody

        /// The reason for logs and error responses, naming the upstream (e.g. "instance", "endpoint").
        package func message(from upstream: String) -> String {
            switch self {
            case .malformedHead: "\(upstream) sent a malformed response head"
            case .headTooLarge: "\(upstream) response head exceeds 64 KiB"
            case .malformedChunkedBody: "\(upstream) sent a malformed chunked body"
            }
        }
    }

    /// What the upstream closing its side of the connection means for the exchange.
    package enum Closed: Equatable {
        /// No exchange was in progress.
        case idle
        /// A close-delimited body ended: the response is complete (the connection cannot be reused).
        case complete
        /// The upstream closed before the response head was complete.
        case beforeHead
        /// The upstream closed in the middle of a body.
        case midBody
    }

    @usableFromInline
    enum State {
        case idle
        case head(requestWasHEAD: Bool)
        case body(BodyFraming, reusable: Bool)
        /// The whole body has been reported; `complete` is next.
        case ended(reusable: Bool)
    }

    @usableFromInline
    var state = State.idle
    package static let maxHead = 64 << 10

    package init() {}

    /// A request was written: its response is read next. `requestWasHEAD`: the response has no body whatever
    /// its headers say.
    @inlinable
    package mutating func begin(requestWasHEAD: Bool) {
        state = .head(requestWasHEAD: requestWasHEAD)
    }

    /// Forgets the exchange in progress (the connection is being closed or given up).
    @inlinable
    package mutating func reset() {
        state = .idle
    }

    @inlinable
    package var isIdle: Bool {
        if case .idle = state { return true }
        return false
    }

    /// Whether the final head has been read (body bytes, not a head, come next).
    @inlinable
    package var isInBody: Bool {
        switch state {
        case .body, .ended: true
        case .idle, .head: false
        }
    }

    /// What the bytes at the front of the caller's buffer are. `payload`, if given, receives the ranges (offsets
    /// into `bytes`) of body payload within a `.body` event's bytes — chunk data only for a chunked body — for
    /// callers that unwrap the body.
    package mutating func next(_ bytes: UnsafeRawBufferPointer, payload: ((Range<Int>) -> Void)? = nil) -> Event {
        switch state {
        case .idle:
            return bytes.isEmpty ? .needMore : .unexpectedBytes
        case .head(let requestWasHEAD):
            guard let end = HTTPBytes.endOfHead(bytes) else {
                return bytes.count > Self.maxHead ? fail(.headTooLarge) : .needMore
            }
            guard let head = ResponseHead.parse(bytes, headEnd: end, requestWasHEAD: requestWasHEAD) else {
                return fail(.malformedHead)
            }
            if (100..<200).contains(head.status) { return .interim(head, length: end) }
            state = .body(head.framing, reusable: !head.connectionClose)
            return .head(head, length: end)
        case .body(let framing, let reusable):
            switch framing {
            case .none:
                return complete(reusable: reusable && bytes.isEmpty)
            case .length(let remaining):
                guard !bytes.isEmpty else { return .needMore }
                let take = min(remaining, bytes.count)
                payload?(0..<take)
                state = take == remaining ? .ended(reusable: reusable) : .body(.length(remaining: remaining - take), reusable: reusable)
                return .body(count: take)
            case .chunked(var scanner):
                guard !bytes.isEmpty else { return .needMore }
                let consumed: Int
                do {
                    if let payload {
                        consumed = try scanner.scan(bytes, payload: payload)
                    } else {
                        consumed = try scanner.scan(bytes)
                    }
                } catch {
                    return fail(.malformedChunkedBody)
                }
                state = scanner.isDone ? .ended(reusable: reusable) : .body(.chunked(scanner), reusable: reusable)
                if consumed > 0 { return .body(count: consumed) }
                // The scanner takes every byte it is shown until the body ends.
                return scanner.isDone ? next(bytes, payload: payload) : .needMore
            case .untilClose:
                guard !bytes.isEmpty else { return .needMore }
                payload?(0..<bytes.count)
                return .body(count: bytes.count)
            }
        case .ended(let reusable):
            return complete(reusable: reusable && bytes.isEmpty)
        }
    }

    /// The upstream closed its side of the connection (end of file).
    package mutating func upstreamClosed() -> Closed {
        defer { state = .idle }
        switch state {
        case .idle: return .idle
        case .head: return .beforeHead
        case .body(.untilClose, _), .ended: return .complete
        case .body: return .midBody
        }
    }

    private mutating func complete(reusable: Bool) -> Event {
        state = .idle
        return .complete(reusable: reusable)
    }

    private mutating func fail(_ failure: Failure) -> Event {
        state = .idle
        return .failed(failure)
    }
}
