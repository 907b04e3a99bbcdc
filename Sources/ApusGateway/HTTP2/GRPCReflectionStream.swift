import ApusCore
import ApusWire
import NIOCore
import NIOHPACK
import NIOHTTP2

/// The gateway's part of gRPC server reflection (`grpc.reflection.v1` and `v1alpha`
/// `ServerReflection/ServerReflectionInfo`): `list_services` answers with every gRPC service a function serves, plus
/// the gateway's own health and reflection services, so `grpcurl list` and similar tools see what the port offers.
/// File descriptors belong to the functions' protos, which the gateway does not hold: those requests get an
/// `ErrorResponse` (NOT_FOUND) saying so, and the stream stays open.
final class GRPCReflectionStream: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    static let services = FunctionManifest.GRPCSettings.reflectionServices

    private let shared: GatewayShared
    private var buffered = ByteBuffer()
    private var headersSent = false
    private var ended = false

    init(shared: GatewayShared) {
        self.shared = shared
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !ended else { return }
        switch unwrapInboundIn(data) {
        case .headers(let headers):
            let path = headers.headers.first(name: ":path") ?? ""
            guard path.hasSuffix("/ServerReflectionInfo") else {
                end(context: context, status: GRPCWire.statusUnimplemented, message: "unknown method \(path)")
                return
            }
            if headers.endStream { end(context: context, status: GRPCWire.statusOK, message: "") }
        case .data(let data):
            if case .byteBuffer(var bytes) = data.data { buffered.writeBuffer(&bytes) }
            do throws(ApusError) {
                while let message = try GRPCWire.firstRequestMessage(in: buffered) {
                    buffered.moveReaderIndex(forwardBy: 5 + message.count)
                    answer(message, context: context)
                }
            } catch {
                end(context: context, status: GRPCWire.statusInternal, message: error.message)
                return
            }
            if buffered.readableBytes > 1 << 20 {
                end(context: context, status: GRPCWire.statusResourceExhausted, message: "reflection request too large")
            } else if data.endStream {
                end(context: context, status: GRPCWire.statusOK, message: "")
            }
        default:
            break
        }
    }

    private func answer(_ request: [UInt8], context: ChannelHandlerContext) {
        var response = ProtobufWriter()
        let fields = ProtobufWriter.topLevelFields(request)
        if let host = fields.first(where: { $0.number == 1 })?.bytes { response.bytes(1, host) }
        response.bytes(2, request)  // original_request
        if fields.contains(where: { $0.number == 7 }) {
            var list = ProtobufWriter()
            let names = Set(shared.scheduler.catalog.grpcServiceNames + [GRPCHealthStream.service] + Self.services).sorted()
            for name in names {
                var service = ProtobufWriter()
                service.bytes(1, Array(name.utf8))
                list.bytes(1, service.output)
            }
            response.bytes(6, list.output)  // list_services_response
        } else {
            var error = ProtobufWriter()
            error.varint(1, UInt64(GRPCWire.statusNotFound))
            error.bytes(2, Array("the gateway lists services; file descriptors come from each function's own protos (IDL/)".utf8))
            response.bytes(7, error.output)  // error_response
        }
        if !headersSent {
            headersSent = true
            var headers = HPACKHeaders()
            headers.add(name: ":status", value: "200")
            headers.add(name: "content-type", value: "application/grpc")
            context.write(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
        }
        let frame = GRPCWire.frameMessage(response.output, allocator: context.channel.allocator)
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(frame)))), promise: nil)
    }

    private func end(context: ChannelHandlerContext, status: Int, message: String) {
        ended = true
        let headers = headersSent ? GRPCWire.trailers(status: status, message: message) : GRPCWire.trailersOnly(status: status, message: message)
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: headers, endStream: true))), promise: nil)
    }
}

/// The little protobuf the gateway writes and reads itself (reflection, health): length-delimited and varint
/// fields only.
struct ProtobufWriter {
    private(set) var output: [UInt8] = []

    mutating func varint(_ field: Int, _ value: UInt64) {
        writeVarint(UInt64(field << 3))
        writeVarint(value)
    }

    mutating func bytes(_ field: Int, _ value: [UInt8]) {
        writeVarint(UInt64(field << 3 | 2))
        writeVarint(UInt64(value.count))
        output += value
    }

    private mutating func writeVarint(_ value: UInt64) {
        var rest = value
        while rest >= 0x80 {
            output.append(UInt8(rest & 0x7F | 0x80))
            rest >>= 7
        }
        output.append(UInt8(rest))
    }

    struct Field {
        var number: Int
        /// Length-delimited payload; nil for other wire types.
        var bytes: [UInt8]?
    }

    /// The top-level fields of a message; parsing stops at the first malformed byte.
    static func topLevelFields(_ message: [UInt8]) -> [Field] {
        parse(message).fields
    }

    /// The top-level fields, and whether the whole message parsed (false: malformed from some byte on).
    static func parse(_ message: [UInt8]) -> (fields: [Field], complete: Bool) {
        var fields: [Field] = []
        var index = 0
        func varint() -> UInt64? {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while index < message.count, shift < 64 {
                let byte = message[index]
                index += 1
                value |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }
        while index < message.count {
            guard let key = varint() else { return (fields, false) }
            let number = Int(key >> 3)
            switch key & 7 {
            case 0:
                guard varint() != nil else { return (fields, false) }
                fields.append(Field(number: number, bytes: nil))
            case 1, 5:
                let width = key & 7 == 1 ? 8 : 4
                guard index + width <= message.count else { return (fields, false) }
                index += width
                fields.append(Field(number: number, bytes: nil))
            case 2:
                guard let length = varint(), index + Int(length) <= message.count else { return (fields, false) }
                fields.append(Field(number: number, bytes: Array(message[index..<index + Int(length)])))
                index += Int(length)
            default:
                return (fields, false)
            }
        }
        return (fields, true)
    }
}
