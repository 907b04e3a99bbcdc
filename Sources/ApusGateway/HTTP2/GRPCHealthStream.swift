import ApusCore
import ApusWire
import NIOCore
import NIOHPACK
import NIOHTTP2

/// The gateway's own `grpc.health.v1.Health` service, so standard health checkers work against it. Service ""
/// is the gateway itself; any other name is a gRPC service a function declares (SERVING while the function has
/// a released version). `Check` answers once; `Watch` sends the status now and again whenever it changes.
final class GRPCHealthStream: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    static let service = FunctionManifest.GRPCSettings.healthService

    enum ServingStatus: UInt8 {
        case serving = 1
        case notServing = 2
        case serviceUnknown = 3
    }

    private let shared: GatewayShared
    private var method = ""
    private var body: ByteBuffer?
    private var answered = false
    private var watchTask: Scheduled<Void>?
    private var lastSent: ServingStatus?

    init(shared: GatewayShared) {
        self.shared = shared
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !answered else { return }
        switch unwrapInboundIn(data) {
        case .headers(let headers):
            if method.isEmpty {
                method = String(headers.headers.first(name: ":path")?.dropFirst(Self.service.count + 2) ?? "")
            }
            if headers.endStream { answer(context: context) }
        case .data(let data):
            if case .byteBuffer(var bytes) = data.data {
                if body == nil { body = bytes } else { body!.writeBuffer(&bytes) }
            }
            if (body?.readableBytes ?? 0) > 4096 {
                finish(context: context, status: GRPCWire.statusInternal, message: "health request too large", headersSent: false)
            } else if data.endStream {
                answer(context: context)
            }
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        watchTask?.cancel()
        watchTask = nil
        context.fireChannelInactive()
    }

    private func answer(context: ChannelHandlerContext) {
        answered = true
        let service: String
        do throws(ApusError) {
            guard let message = try GRPCWire.firstRequestMessage(in: body ?? ByteBuffer()) else {
                throw ApusError(.badRequest, "missing HealthCheckRequest message")
            }
            service = try Self.decodeServiceName(message)
        } catch {
            finish(context: context, status: GRPCWire.statusInternal, message: error.message, headersSent: false)
            return
        }
        switch method {
        case "Check":
            let status = self.status(of: service)
            if status == .serviceUnknown {
                finish(context: context, status: GRPCWire.statusNotFound, message: "unknown service \(service)", headersSent: false)
                return
            }
            sendHeaders(context: context)
            send(status, context: context)
            finish(context: context, status: GRPCWire.statusOK, message: "", headersSent: true)
        case "Watch":
            sendHeaders(context: context)
            send(status(of: service), context: context)
            watch(service, context: context)
        default:
            finish(context: context, status: GRPCWire.statusUnimplemented, message: "method \(method) not found on \(Self.service)", headersSent: false)
        }
    }

    /// Re-checks every second while the watcher stays; sends only changes.
    private func watch(_ service: String, context: ChannelHandlerContext) {
        watchTask = context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(1)) { [self] in
            guard context.channel.isActive else { return }
            let now = status(of: service)
            if now != lastSent { send(now, context: context) }
            watch(service, context: context)
        }
    }

    private func status(of service: String) -> ServingStatus {
        if service.isEmpty { return .serving }
        let catalog = shared.scheduler.catalog
        guard let function = catalog.function(servingGRPCService: service) else { return .serviceUnknown }
        return (try? catalog.route(function: function, pinnedVersion: nil, roll: 0)) != nil ? .serving : .notServing
    }

    private func sendHeaders(context: ChannelHandlerContext) {
        var headers = HPACKHeaders()
        headers.add(name: ":status", value: "200")
        headers.add(name: "content-type", value: "application/grpc")
        context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
    }

    private func send(_ status: ServingStatus, context: ChannelHandlerContext) {
        lastSent = status
        // HealthCheckResponse { ServingStatus status = 1; }: field 1, varint.
        let frame = GRPCWire.frameMessage([0x08, status.rawValue], allocator: context.channel.allocator)
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(frame)))), promise: nil)
    }

    private func finish(context: ChannelHandlerContext, status: Int, message: String, headersSent: Bool) {
        answered = true
        let headers = headersSent ? GRPCWire.trailers(status: status, message: message) : GRPCWire.trailersOnly(status: status, message: message)
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: headers, endStream: true))), promise: nil)
    }

    /// HealthCheckRequest { string service = 1; }: reads field 1, skips any other field.
    static func decodeServiceName(_ message: [UInt8]) throws(ApusError) -> String {
        let (fields, complete) = ProtobufWriter.parse(message)
        guard complete else { throw ApusError(.badRequest, "malformed HealthCheckRequest") }
        return fields.last { $0.number == 1 }?.bytes.map { String(decoding: $0, as: UTF8.self) } ?? ""
    }
}
