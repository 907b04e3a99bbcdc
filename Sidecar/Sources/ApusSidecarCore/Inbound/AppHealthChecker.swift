import NIOCore
import NIOPosix

/// Probes the app every interval: a TCP connect, or `GET <path>` expecting 2xx. Unhealthy after
/// `unhealthyAfter` failed probes in a row, healthy again after one success.
struct AppHealthChecker: Sendable {
    let group: any EventLoopGroup
    let host: String
    let port: Int

    func probe(_ check: SidecarConfig.HealthCheck) async -> Bool {
        switch check.kind {
        case .none:
            return true
        case .tcp:
            do {
                let channel = try await ClientBootstrap(group: group).connectTimeout(.milliseconds(500)).connect(host: host, port: port).get()
                try? await channel.close()
                return true
            } catch {
                return false
            }
        case .http:
            return await httpProbe(path: check.path)
        }
    }

    private func httpProbe(path: String) async -> Bool {
        let promise = group.next().makePromise(of: Int.self)
        let request = "GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUser-Agent: apus-sidecar-health\r\nConnection: close\r\n\r\n"
        do {
            let channel = try await ClientBootstrap(group: group)
                .connectTimeout(.milliseconds(500))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(StatusLineReader(promise: promise)) }
                }
                .connect(host: host, port: port).get()
            try await channel.writeAndFlush(ByteBuffer(string: request))
            let timeout = channel.eventLoop.scheduleTask(in: .seconds(1)) { promise.fail(ChannelError.connectTimeout(.seconds(1))) }
            let status = try await promise.futureResult.get()
            timeout.cancel()
            try? await channel.close()
            return (200..<300).contains(status)
        } catch {
            promise.fail(error)
            return false
        }
    }
}

private final class StatusLineReader: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let promise: EventLoopPromise<Int>
    private var buffer = ByteBuffer()
    private var done = false

    init(promise: EventLoopPromise<Int>) {
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        buffer.writeBuffer(&incoming)
        guard !done, buffer.readableBytes >= 12 else { return }
        done = true
        let line = String(buffer: buffer)
        let parts = line.split(separator: " ", maxSplits: 2)
        promise.succeed(parts.count >= 2 ? Int(parts[1]) ?? 0 : 0)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done { promise.fail(ChannelError.eof) }
    }
}
