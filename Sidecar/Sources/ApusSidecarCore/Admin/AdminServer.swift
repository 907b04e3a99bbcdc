import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

/// The admin listener: `GET /metrics` (Prometheus text), `GET /healthz`, `GET /upstreams` (JSON state of every
/// upstream: endpoints, ejections, breaker).
public enum AdminServer {
    public static func bind(group: any EventLoopGroup, host: String, port: Int, sidecar: Sidecar,
                            metrics: PrometheusCollectorRegistry?) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(sidecar: sidecar, metrics: metrics))
                }
            }
            .bind(host: host, port: port)
            .get()
    }
}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let sidecar: Sidecar
    private let metrics: PrometheusCollectorRegistry?
    private var head: HTTPRequestHead?

    init(sidecar: Sidecar, metrics: PrometheusCollectorRegistry?) {
        self.sidecar = sidecar
        self.metrics = metrics
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body:
            break
        case .end:
            guard let head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            let (status, type, body): (HTTPResponseStatus, String, ByteBuffer)
            switch (head.method, path) {
            case (.GET, "/metrics"):
                if let metrics {
                    (status, type, body) = (.ok, "text/plain; version=0.0.4; charset=utf-8", ByteBuffer(bytes: metrics.emitToBuffer()))
                } else {
                    (status, type, body) = (.notFound, "text/plain", ByteBuffer(string: "metrics are not enabled\n"))
                }
            case (.GET, "/healthz"):
                let draining = sidecar.shared.draining.load(ordering: .relaxed)
                (status, type, body) = (draining ? .serviceUnavailable : .ok, "application/json",
                                        ByteBuffer(string: "{\"status\":\"\(draining ? "draining" : "ok")\",\"app_healthy\":\(sidecar.appHealthy)}\n"))
            case (.GET, "/upstreams"):
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                encoder.keyEncodingStrategy = .convertToSnakeCase
                let now = SidecarClock.now()
                let snapshot = AdminUpstreams(upstreams: sidecar.shared.directory.all.map { $0.snapshot(now: now) },
                                              app: sidecar.shared.app?.snapshot(now: now), inboundInFlight: sidecar.shared.limits.inFlight)
                let data = (try? encoder.encode(snapshot)) ?? Data("{}".utf8)
                (status, type, body) = (.ok, "application/json", ByteBuffer(bytes: data))
            default:
                (status, type, body) = (.notFound, "application/json", ByteBuffer(string: "{\"error\":\"not found: \(path)\"}\n"))
            }
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: type)
            headers.add(name: "content-length", value: String(body.readableBytes))
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}

struct AdminUpstreams: Codable {
    var upstreams: [UpstreamSnapshot]
    var app: UpstreamSnapshot?
    var inboundInFlight: Int
}
