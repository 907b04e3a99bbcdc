import ApusCore
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import NIOSSL

/// A failure the CLI reports as one line on stderr before exiting non-zero.
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Talks to the control API (and, for `invoke`, the gateway it names).
struct APIClient {
    let base: String
    /// The bearer token sent with every call to `base` (never to another URL, such as the gateway's).
    var token: String?

    /// One client for the CLI's short life; a refused connection fails at once instead of being retried.
    static let http: HTTPClient = {
        var configuration = HTTPClient.Configuration()
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.timeout = .init(connect: .seconds(5))
        configuration.redirectConfiguration = .disallow
        // An API served with apusd --api-tls-cert by a certificate of its own: trust that certificate (PEM).
        if let caFile = ProcessInfo.processInfo.environment["APUS_CACERT"], !caFile.isEmpty {
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.trustRoots = .file(caFile)
            configuration.tlsConfiguration = tls
        }
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    /// The directory of a local apusd's state, as `Scripts/up` leaves it.
    static let localDataDirectory = ".apus"

    /// `--api`, then `APUS_API`, then `./.apus/ports.json` of a local apusd, then the default port.
    static func resolveBase(_ flag: String?) -> String {
        if let flag, !flag.isEmpty { return trim(flag) }
        if let env = ProcessInfo.processInfo.environment["APUS_API"], !env.isEmpty { return trim(env) }
        return localAPI() ?? "http://127.0.0.1:7070"
    }

    /// The API URL `./.apus/ports.json` records, if there is one.
    static func localAPI() -> String? {
        guard let data = FileManager.default.contents(atPath: localDataDirectory + "/ports.json"),
              let ports = try? JSONDecoder().decode(Ports.self, from: data) else { return nil }
        let host = ports.apiHost ?? ports.host
        return "\(ports.apiScheme ?? "http")://\(host.contains(":") ? "[\(host)]" : host):\(ports.api)"
    }

    /// `--token`, then `APUS_TOKEN`, then the admin token a local apusd wrote to `./.apus/admin.token` (the way
    /// kubectl finds its kubeconfig) — that one only when `base` is that apusd's API, so it never leaves for
    /// another server.
    static func resolveToken(_ flag: String?, base: String) -> String? {
        if let flag, !flag.isEmpty { return flag }
        if let env = ProcessInfo.processInfo.environment["APUS_TOKEN"], !env.isEmpty { return env }
        guard let local = localAPI(), trim(local) == base,
              let data = FileManager.default.contents(atPath: localDataDirectory + "/admin.token") else { return nil }
        let secret = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return secret.isEmpty ? nil : secret
    }

    private struct Ports: Decodable {
        var host: String
        var apiHost: String?
        var apiScheme: String?
        var api: Int
    }

    private static func trim(_ url: String) -> String {
        url.hasSuffix("/") ? String(url.dropLast()) : url
    }

    struct Reply {
        var status: Int
        var headers: HTTPHeaders
        var body: Data
    }

    func send(_ method: HTTPMethod, url: String, headers: [(String, String)] = [], body: Data? = nil, timeout: TimeAmount = .seconds(120)) async throws -> Reply {
        var request = HTTPClientRequest(url: url)
        request.method = method
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        if let token, url.hasPrefix(base + "/") { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let body { request.body = .bytes(ByteBuffer(bytes: body)) }
        do {
            let response = try await Self.http.execute(request, timeout: timeout)
            let buffer = try await response.body.collect(upTo: 256 << 20)
            return Reply(status: Int(response.status.code), headers: response.headers, body: Data(buffer: buffer))
        } catch {
            throw CLIError("cannot reach \(url): \(Self.describe(error))")
        }
    }

    static func describe(_ error: any Error) -> String {
        let text = "\(error)"
        if text.contains("connectTimeout") || text.contains("Connection refused") || text.contains("connectionRefused") {
            return "connection refused (is apusd running? set --api or APUS_API)"
        }
        return text
    }

    /// Calls the API and returns the body of a 2xx answer, or throws the API's error message.
    func call(_ method: HTTPMethod, _ path: String, body: Data? = nil, contentType: String = "application/json") async throws -> Data {
        let headers = body == nil ? [] : [("Content-Type", contentType)]
        let reply = try await send(method, url: base + path, headers: headers, body: body)
        guard (200..<300).contains(reply.status) else {
            throw CLIError(Self.errorMessage(reply))
        }
        return reply.body
    }

    static func errorMessage(_ reply: Reply) -> String {
        struct Envelope: Decodable {
            struct Inner: Decodable { var code: String; var message: String }
            var error: Inner
        }
        if let envelope = try? JSONDecoder().decode(Envelope.self, from: reply.body) {
            return "\(envelope.error.message) (\(envelope.error.code), HTTP \(reply.status))"
        }
        let text = String(decoding: reply.body.prefix(300), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return "HTTP \(reply.status)\(text.isEmpty ? "" : ": \(text)")"
    }

    func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do {
            return try decoder.decode(type, from: data)
        } catch {
            throw CLIError("unexpected answer from the API: \(error)")
        }
    }

    /// Streams a response body to stdout as it arrives (for `logs --follow`).
    func stream(_ path: String) async throws {
        var request = HTTPClientRequest(url: base + path)
        if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
        let response: HTTPClientResponse
        do {
            response = try await Self.http.execute(request, timeout: .hours(24 * 365))
        } catch {
            throw CLIError("cannot reach \(base): \(Self.describe(error))")
        }
        guard response.status.code < 300 else {
            let body = try await response.body.collect(upTo: 1 << 20)
            throw CLIError(Self.errorMessage(Reply(status: Int(response.status.code), headers: response.headers, body: Data(buffer: body))))
        }
        for try await chunk in response.body {
            FileHandle.standardOutput.write(Data(buffer: chunk))
        }
    }
}
