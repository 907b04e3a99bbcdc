#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ApusCore

/// One readiness check: the instance accepts a TCP connection on loopback and answers `GET /healthz`
/// (sent with `X-Apus-Probe: 1`) with a status below 500 — or, for a gRPC instance, answers the HTTP/2
/// connection preface with a SETTINGS frame; a Thrift instance is ready once it accepts the connection.
/// Blocking; run it off the async pool.
enum ReadinessProbe {
    enum Outcome: Equatable {
        case ready
        case notListening
        case unhealthy(String)
    }

    enum Kind {
        /// `GET /healthz` over HTTP/1.1.
        case http
        /// The HTTP/2 connection preface (gRPC).
        case http2
        /// Accepting the TCP connection is enough.
        case tcp
    }

    static func check(port: Int, kind: Kind = .http, timeoutMilliseconds: Int = 1000) -> Outcome {
        check(.loopback(port: port), kind: kind, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// One probe of `endpoint` (the instance's address in its namespace, or loopback).
    static func check(_ endpoint: InstanceEndpoint, kind: Kind = .http, timeoutMilliseconds: Int = 1000) -> Outcome {
        let port = endpoint.port
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return .notListening }
        defer { close(fd) }
        var timeout = timeval(tv_sec: timeoutMilliseconds / 1000, tv_usec: (timeoutMilliseconds % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = socketAddress(endpoint)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return .notListening }
        switch kind {
        case .http: break
        case .http2: return checkHTTP2(fd)
        case .tcp: return .ready
        }
        let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nX-Apus-Probe: 1\r\nConnection: close\r\n\r\n"
        let sent = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
        guard sent > 0 else { return .unhealthy("probe could not be sent") }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        while received.count < 4096, !received.contains(UInt8(ascii: "\n")) {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            received += buffer[0..<n]
        }
        guard let lineEnd = received.firstIndex(of: UInt8(ascii: "\n")) else {
            return .unhealthy(received.isEmpty ? "no answer to GET /healthz" : "unparseable answer to GET /healthz")
        }
        let statusLine = String(decoding: received[..<lineEnd], as: UTF8.self)
        let parts = statusLine.split(separator: " ")
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/"), let status = Int(parts[1]) else {
            return .unhealthy("unparseable status line \(statusLine.prefix(80))")
        }
        return status < 500 ? .ready : .unhealthy("GET /healthz answered \(status)")
    }

    /// Sends the client connection preface and an empty SETTINGS frame; ready when a SETTINGS frame comes back.
    private static func checkHTTP2(_ fd: Int32) -> Outcome {
        var hello = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
        hello += [0, 0, 0, 4, 0, 0, 0, 0, 0]
        let sent = hello.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == hello.count else { return .unhealthy("HTTP/2 preface could not be sent") }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 256)
        while received.count < 9 {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            received += buffer[0..<n]
        }
        guard received.count >= 9 else {
            return .unhealthy(received.isEmpty ? "no answer to the HTTP/2 preface" : "short answer to the HTTP/2 preface")
        }
        return received[3] == 4 ? .ready : .unhealthy("answered the HTTP/2 preface with frame type \(received[3]), not SETTINGS")
    }
}
