// apus-bench-thrift: a Thrift load client for Scripts/bench-thrift.
//
// Calls `i32 add(1: i32 num1, 2: i32 num2)` of the `Calculator` service (IDL/examples/calculator.thrift) over
// N TCP connections, framed transport (4-byte big-endian length) and the strict binary protocol, both encoded
// and decoded here by hand (no libthrift). Every connection keeps `--pipeline` calls in flight (default 1: the
// next call goes out when the reply to the previous one is in). Each reply must be a REPLY message whose seqid
// is that of a call in flight on the connection and whose result struct carries field 0 as an i32 equal to
// num1 + num2; anything else counts as an error. The run prints one JSON object on stdout.
//
// All connections live on one SwiftNIO event loop by default (`--threads`), so the client costs a few
// microseconds of CPU per call; its own CPU time per call is part of the output to show it was not the limit.
//
// Usage: apus-bench-thrift [--host] HOST [--port] PORT [--connections N] [--duration S | --calls N]
//                          [--warmup S] [--pipeline D] [--multiplexed SERVICE] [--method NAME] [--threads T]
//                          [--call-timeout S] [--label TEXT]

import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - Options

struct Options: Sendable {
    var host = "127.0.0.1"
    var port = 0
    var connections = 8
    var duration = 10.0
    var calls: Int?
    var warmup = 0.0
    var pipeline = 1
    var multiplexed: String?
    var method = "add"
    var threads = 1
    var callTimeout = 10.0
    var label: String?

    static let usage = """
        usage: apus-bench-thrift [--host] HOST [--port] PORT [options]

          --connections N        TCP connections (default 8)
          --duration S           measured seconds (default 10), after the warm-up
          --calls N              measure N calls in total instead of a duration
          --warmup S             seconds of calls before measuring, on the same connections (default 0)
          --pipeline D           calls in flight per connection (default 1: one at a time)
          --multiplexed SERVICE  send "SERVICE:method" (TMultiplexedProtocol) instead of the plain name
          --method NAME          the method name to send (default add; it must take two i32s and return one)
          --threads T            event loop threads of the client (default 1)
          --call-timeout S       a connection with calls in flight and no reply for S seconds fails (default 10)
          --label TEXT           copied into the JSON output as "label"

        Prints one JSON object: calls, calls_per_s, p50_us, p90_us, p99_us, max_us, mean_us, errors, ...
        """

    static func parse(_ arguments: [String]) throws -> Options {
        var options = Options()
        var positional: [String] = []
        var i = 0
        func value(_ name: String) throws -> String {
            i += 1
            guard i < arguments.count else { throw UsageError("\(name) needs a value") }
            return arguments[i]
        }
        func int(_ name: String, min: Int) throws -> Int {
            let text = try value(name)
            guard let n = Int(text), n >= min else { throw UsageError("\(name): expected an integer ≥ \(min), got '\(text)'") }
            return n
        }
        func seconds(_ name: String, min: Double) throws -> Double {
            var text = try value(name)
            var scale = 1.0
            if text.hasSuffix("ms") {
                text.removeLast(2)
                scale = 0.001
            } else if text.hasSuffix("s") {
                text.removeLast()
            }
            guard let n = Double(text), n >= min, n.isFinite else {
                throw UsageError("\(name): expected seconds ≥ \(min), got '\(arguments[i])'")
            }
            return n * scale
        }
        while i < arguments.count {
            let argument = arguments[i]
            switch argument {
            case "-h", "--help":
                print(usage)
                exit(0)
            case "--host": options.host = try value(argument)
            case "--port": options.port = try int(argument, min: 1)
            case "-c", "--connections": options.connections = try int(argument, min: 1)
            case "-d", "--duration": options.duration = try seconds(argument, min: 0.001)
            case "-n", "--calls": options.calls = try int(argument, min: 1)
            case "--warmup": options.warmup = try seconds(argument, min: 0)
            case "-p", "--pipeline": options.pipeline = try int(argument, min: 1)
            case "--multiplexed": options.multiplexed = try value(argument)
            case "--method": options.method = try value(argument)
            case "-t", "--threads": options.threads = try int(argument, min: 1)
            case "--call-timeout": options.callTimeout = try seconds(argument, min: 0.001)
            case "--label": options.label = try value(argument)
            default:
                if argument.hasPrefix("-") { throw UsageError("unknown option \(argument)") }
                positional.append(argument)
            }
            i += 1
        }
        // HOST PORT, HOST:PORT or PORT alone.
        if positional.count == 1, let colon = positional[0].lastIndex(of: ":") {
            let host = String(positional[0][..<colon])
            positional = [host.isEmpty ? options.host : host, String(positional[0][positional[0].index(after: colon)...])]
        }
        switch positional.count {
        case 0: break
        case 1:
            if let port = Int(positional[0]) { options.port = port } else { options.host = positional[0] }
        case 2:
            options.host = positional[0]
            guard let port = Int(positional[1]) else { throw UsageError("not a port: '\(positional[1])'") }
            options.port = port
        default:
            throw UsageError("unexpected arguments: \(positional.joined(separator: " "))")
        }
        guard (1...65535).contains(options.port) else { throw UsageError("a port (1-65535) is required") }
        if let calls = options.calls, calls < options.connections {
            options.connections = calls  // every connection gets at least one call
        }
        return options
    }
}

struct UsageError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

// MARK: - Wire format

/// Strict binary protocol constants.
enum Wire {
    static let version1: UInt32 = 0x8001_0000
    static let versionMask: UInt32 = 0xFFFF_0000
    static let call: UInt8 = 1
    static let reply: UInt8 = 2
    static let exception: UInt8 = 3
    static let typeStop: UInt8 = 0
    static let typeI32: UInt8 = 8
    static let typeString: UInt8 = 11
    static let maxFrame = 16 << 20
}

/// The framed request with placeholders; per call only seqid, num1 and num2 are patched in.
struct RequestTemplate: Sendable {
    let bytes: [UInt8]
    let seqidOffset: Int
    let num1Offset: Int
    let num2Offset: Int

    init(name: String) {
        let nameBytes = Array(name.utf8)
        var message: [UInt8] = []
        func i32(_ value: UInt32) {
            message.append(UInt8(truncatingIfNeeded: value >> 24))
            message.append(UInt8(truncatingIfNeeded: value >> 16))
            message.append(UInt8(truncatingIfNeeded: value >> 8))
            message.append(UInt8(truncatingIfNeeded: value))
        }
        i32(Wire.version1 | UInt32(Wire.call))   // strict header: version, message type CALL
        i32(UInt32(nameBytes.count))               // method name
        message += nameBytes
        let seqid = message.count
        i32(0)                                     // seqid
        message += [Wire.typeI32, 0, 1]            // field 1: i32 num1
        let num1 = message.count
        i32(0)
        message += [Wire.typeI32, 0, 2]            // field 2: i32 num2
        let num2 = message.count
        i32(0)
        message.append(Wire.typeStop)              // end of the args struct
        var framed: [UInt8] = []
        let length = UInt32(message.count)
        framed += [UInt8(length >> 24), UInt8(truncatingIfNeeded: length >> 16),
                   UInt8(truncatingIfNeeded: length >> 8), UInt8(truncatingIfNeeded: length)]
        framed += message
        bytes = framed
        seqidOffset = seqid + 4
        num1Offset = num1 + 4
        num2Offset = num2 + 4
    }
}

// MARK: - Run plan and per-connection results

/// Times are `NIODeadline` uptime nanoseconds.
struct Plan: Sendable {
    var template: RequestTemplate
    var methodNames: [[UInt8]]   // accepted names in a reply
    var pipeline: Int
    var warmupEnd: UInt64
    var measureEnd: UInt64?      // nil: --calls
    var quota: Int               // --calls: calls this connection makes after the warm-up
    var callTimeout: UInt64
    var expectedCalls: Int       // to size the latency array
}

struct ConnectionResult: Sendable {
    var latencies: [UInt64] = []     // ns, of the counted calls
    var counted = 0
    var errors = 0
    var errorSamples: [String] = []
    var lastCountedReply: UInt64 = 0 // --calls: when this connection's last counted reply came in
    var warmupCalls = 0
}

@inline(__always) func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

// MARK: - The connection handler

/// Runs the calls of one connection. Touched only on its channel's event loop (hence the unchecked Sendable:
/// main() hands it to that loop and never uses it again).
final class LoadHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let index: Int32
    private var plan: Plan!
    private var promise: EventLoopPromise<ConnectionResult>?
    private var context: ChannelHandlerContext?
    private var result = ConnectionResult()

    // Calls in flight, by seqid: slot = seqid & mask. A slot holds its call's seqid and send time.
    private var slotSeqid: [Int32] = []
    private var slotSent: [UInt64] = []
    private var slotMeasured: [Bool] = []
    private var mask: Int32 = 0
    private var nextSeqid: Int32 = 1
    private var inFlight = 0
    private var sentAfterWarmup = 0
    private var stopping = false
    private var finished = false
    private var needsFlush = false
    private var lastProgress: UInt64 = 0
    private var watchdog: RepeatedTask?
    private var pending: ByteBuffer?

    init(index: Int) {
        self.index = Int32(index)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    /// Starts sending; called on the channel's event loop.
    func start(plan: Plan, promise: EventLoopPromise<ConnectionResult>) {
        self.plan = plan
        self.promise = promise
        var size = 64
        while size < plan.pipeline * 4 { size <<= 1 }
        slotSeqid = Array(repeating: 0, count: size)
        slotSent = Array(repeating: 0, count: size)
        slotMeasured = Array(repeating: false, count: size)
        mask = Int32(size - 1)
        result.latencies.reserveCapacity(plan.expectedCalls)
        guard let context else {
            fail("not connected")
            finish()
            return
        }
        lastProgress = now()
        let interval = TimeAmount.milliseconds(100)
        watchdog = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [self] _ in
            self.checkProgress()
        }
        for _ in 0..<plan.pipeline where !stopping {
            send(context: context, at: lastProgress)
        }
        flushIfNeeded(context: context)
    }

    private func send(context: ChannelHandlerContext, at time: UInt64) {
        if let measureEnd = plan.measureEnd {
            if time >= measureEnd { stopping = true; return }
        } else if time >= plan.warmupEnd {
            if sentAfterWarmup >= plan.quota { stopping = true; return }
            sentAfterWarmup += 1
        }
        let seqid = nextSeqid
        nextSeqid = nextSeqid == Int32.max ? 1 : nextSeqid + 1
        let num1 = seqid % 1_000_000
        var buffer = context.channel.allocator.buffer(capacity: plan.template.bytes.count)
        buffer.writeBytes(plan.template.bytes)
        buffer.setInteger(seqid, at: plan.template.seqidOffset)
        buffer.setInteger(num1, at: plan.template.num1Offset)
        buffer.setInteger(index, at: plan.template.num2Offset)
        let slot = Int(seqid & mask)
        if slotSeqid[slot] != 0 {
            // The call that had this slot never got its reply while `mask + 1` later calls were sent.
            error("no reply to seqid \(slotSeqid[slot]) while later calls were answered")
            inFlight -= 1
        }
        slotSeqid[slot] = seqid
        slotSent[slot] = time
        // --calls: a call sent after the warm-up is counted; --duration: a reply within the window is.
        slotMeasured[slot] = plan.measureEnd == nil && time >= plan.warmupEnd
        inFlight += 1
        context.write(wrapOutboundOut(buffer), promise: nil)
        needsFlush = true
    }

    private func flushIfNeeded(context: ChannelHandlerContext) {
        if needsFlush {
            needsFlush = false
            context.flush()
        }
        if stopping && inFlight == 0 { finish() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !finished else { return }
        var incoming = unwrapInboundIn(data)
        if var buffered = pending {
            buffered.writeBuffer(&incoming)
            pending = nil
            incoming = buffered
        }
        let time = now()
        while !finished {
            guard let length = incoming.getInteger(at: incoming.readerIndex, as: Int32.self) else { break }
            guard length > 0, Int(length) <= Wire.maxFrame else {
                protocolFailure(context: context, "frame length \(length) in a reply")
                return
            }
            guard incoming.readableBytes >= 4 + Int(length) else { break }
            incoming.moveReaderIndex(forwardBy: 4)
            var frame = incoming.readSlice(length: Int(length))!
            handleReply(&frame, context: context, at: time)
        }
        if incoming.readableBytes > 0 && !finished {
            incoming.discardReadBytes()
            pending = incoming
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard !finished else { return }
        flushIfNeeded(context: context)
    }

    private func handleReply(_ frame: inout ByteBuffer, context: ChannelHandlerContext, at time: UInt64) {
        lastProgress = time
        guard let header = frame.readInteger(as: UInt32.self),
              header & Wire.versionMask == Wire.version1,
              let nameLength = frame.readInteger(as: Int32.self), nameLength >= 0,
              let name = frame.readBytes(length: Int(nameLength)),
              let seqid = frame.readInteger(as: Int32.self)
        else {
            protocolFailure(context: context, "a reply that is not a strict binary message")
            return
        }
        let type = UInt8(truncatingIfNeeded: header)
        let slot = Int(seqid & mask)
        guard seqid > 0, slotSeqid[slot] == seqid else {
            error("reply with seqid \(seqid), which matches no call in flight")
            inFlight -= 1
            afterReply(context: context, at: time)
            return
        }
        slotSeqid[slot] = 0
        inFlight -= 1
        let sent = slotSent[slot]
        let counted = plan.measureEnd.map { time >= plan.warmupEnd && time < $0 } ?? slotMeasured[slot]
        if let problem = check(type: type, name: name, seqid: seqid, body: &frame) {
            error(problem)
        } else if counted {
            result.counted += 1
            result.latencies.append(time &- sent)
            result.lastCountedReply = time
        } else if time < plan.warmupEnd {
            result.warmupCalls += 1
        }
        afterReply(context: context, at: time)
    }

    private func afterReply(context: ChannelHandlerContext, at time: UInt64) {
        if !stopping { send(context: context, at: time) }
    }

    /// nil if the reply is a good answer to call `seqid`; the problem otherwise.
    private func check(type: UInt8, name: [UInt8], seqid: Int32, body: inout ByteBuffer) -> String? {
        if type == Wire.exception {
            return "TApplicationException: " + describeApplicationException(&body)
        }
        guard type == Wire.reply else { return "reply of message type \(type), expected REPLY (2)" }
        guard plan.methodNames.contains(name) else {
            return "reply named '\(String(decoding: name, as: UTF8.self))'"
        }
        guard let fieldType = body.readInteger(as: UInt8.self) else { return "truncated result struct" }
        guard fieldType != Wire.typeStop else { return "result struct without field 0" }
        guard let fieldID = body.readInteger(as: Int16.self) else { return "truncated result struct" }
        guard fieldID == 0, fieldType == Wire.typeI32 else {
            return "result field \(fieldID) of type \(fieldType), expected field 0 of type i32 (a declared exception?)"
        }
        guard let value = body.readInteger(as: Int32.self) else { return "truncated result value" }
        let expected = seqid % 1_000_000 + index
        guard value == expected else { return "add returned \(value), expected \(expected)" }
        return nil
    }

    /// "type N: message" of a TApplicationException struct (field 1 string message, field 2 i32 type).
    private func describeApplicationException(_ body: inout ByteBuffer) -> String {
        var message = ""
        var kind: Int32 = -1
        while let fieldType = body.readInteger(as: UInt8.self), fieldType != Wire.typeStop,
              let fieldID = body.readInteger(as: Int16.self) {
            if fieldID == 1, fieldType == Wire.typeString, let length = body.readInteger(as: Int32.self),
               length >= 0, let bytes = body.readBytes(length: Int(length)) {
                message = String(decoding: bytes, as: UTF8.self)
            } else if fieldID == 2, fieldType == Wire.typeI32, let value = body.readInteger(as: Int32.self) {
                kind = value
            } else {
                break
            }
        }
        return "type \(kind): \(message)"
    }

    private func checkProgress() {
        guard !finished, let context else { return }
        let time = now()
        if let measureEnd = plan.measureEnd, time >= measureEnd { stopping = true }
        if inFlight == 0 {
            if stopping { finish() }
            return
        }
        if time &- lastProgress > plan.callTimeout {
            let seconds = Double(plan.callTimeout) / 1e9
            fail("\(inFlight) call(s) without a reply for \(seconds) s")
            context.close(promise: nil)
            finish()
        }
    }

    private func protocolFailure(context: ChannelHandlerContext, _ what: String) {
        fail(what + "; closed the connection")
        context.close(promise: nil)
        finish()
    }

    /// Counts the calls still in flight as failed.
    private func fail(_ what: String) {
        result.errors += max(0, inFlight - 1)
        error(what)
        inFlight = 0
        stopping = true
    }

    private func error(_ what: String) {
        result.errors += 1
        if result.errorSamples.count < 5 && !result.errorSamples.contains(what) {
            result.errorSamples.append(what)
        }
    }

    private func finish() {
        guard !finished else { return }
        finished = true
        stopping = true
        watchdog?.cancel()
        watchdog = nil
        pending = nil
        if let context, context.channel.isActive { context.close(promise: nil) }
        promise?.succeed(result)
        promise = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !finished {
            if inFlight > 0 || !stopping {
                fail("connection closed by the server" + (inFlight > 0 ? " with \(inFlight) call(s) in flight" : ""))
            }
            finish()
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !finished {
            fail("connection error: \(error)")
            finish()
        }
        context.close(promise: nil)
    }
}

// MARK: - Output

func json(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        default:
            if scalar.value < 0x20 {
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }
    return out + "\""
}

func fixed(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "null" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (value * scale).rounded() / scale
    var text = "\(rounded)"
    if text.hasSuffix(".0") && digits == 0 { text.removeLast(2) }
    return text
}

func cpuSeconds() -> (user: Double, system: Double) {
    var usage = rusage()
    #if canImport(Glibc)
    getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
    #else
    getrusage(RUSAGE_SELF, &usage)
    #endif
    return (Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6,
            Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6)
}

func sleep(until deadline: UInt64) {
    let time = now()
    guard deadline > time else { return }
    let ns = deadline - time
    var request = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

// MARK: - main

func fatal(_ message: String, code: Int32 = 2) -> Never {
    var text = "apus-bench-thrift: \(message)\n"
    text.withUTF8 { bytes in _ = write(2, bytes.baseAddress, bytes.count) }
    exit(code)
}

func run() {
    let options: Options
    do {
        options = try Options.parse(Array(CommandLine.arguments.dropFirst()))
    } catch {
        fatal("\(error)\n\n\(Options.usage)")
    }

    let name = options.multiplexed.map { "\($0):\(options.method)" } ?? options.method
    let template = RequestTemplate(name: name)
    var acceptedNames = [Array(options.method.utf8)]
    if name != options.method { acceptedNames.append(Array(name.utf8)) }

    let group = MultiThreadedEventLoopGroup(numberOfThreads: options.threads)
    defer { try? group.syncShutdownGracefully() }

    // Connect everything before the clock starts.
    var handlers: [LoadHandler] = []
    var channels: [any Channel] = []
    for index in 0..<options.connections {
        let handler = LoadHandler(index: index)
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        do {
            channels.append(try bootstrap.connect(host: options.host, port: options.port).wait())
            handlers.append(handler)
        } catch {
            fatal("cannot connect to \(options.host):\(options.port) (connection \(index + 1)): \(error)")
        }
    }

    let start = now()
    let warmupEnd = start + UInt64(options.warmup * 1e9)
    let measureEnd: UInt64? = options.calls == nil ? warmupEnd + UInt64(options.duration * 1e9) : nil
    // Room for the latencies of a connection without growing: generous for what one connection can do here.
    let perConnectionEstimate: Int = {
        if let calls = options.calls { return calls / options.connections + 1 }
        return min(Int(options.duration * 400_000) / options.connections + 1024, 8_000_000)
    }()

    var futures: [EventLoopFuture<ConnectionResult>] = []
    for (index, channel) in channels.enumerated() {
        var quota = 0
        if let calls = options.calls {
            quota = calls / options.connections + (index < calls % options.connections ? 1 : 0)
        }
        let plan = Plan(
            template: template, methodNames: acceptedNames, pipeline: options.pipeline, warmupEnd: warmupEnd,
            measureEnd: measureEnd, quota: quota, callTimeout: UInt64(options.callTimeout * 1e9),
            expectedCalls: perConnectionEstimate)
        let promise = channel.eventLoop.makePromise(of: ConnectionResult.self)
        let handler = handlers[index]
        channel.eventLoop.execute { handler.start(plan: plan, promise: promise) }
        futures.append(promise.futureResult)
    }
    handlers.removeAll()

    sleep(until: warmupEnd)
    let cpuBefore = cpuSeconds()
    var results: [ConnectionResult] = []
    for future in futures {
        do {
            results.append(try future.wait())
        } catch {
            fatal("a connection failed: \(error)")
        }
    }
    let cpuAfter = cpuSeconds()
    for channel in channels { try? channel.close().wait() }

    // MARK: - Summary

    var latencies: [UInt64] = []
    latencies.reserveCapacity(results.reduce(0) { $0 + $1.latencies.count })
    for result in results { latencies += result.latencies }
    latencies.sort()
    let counted = latencies.count
    let errors = results.reduce(0) { $0 + $1.errors }
    var samples: [String] = []
    for result in results {
        for sample in result.errorSamples where samples.count < 10 && !samples.contains(sample) { samples.append(sample) }
    }
    let elapsed: Double = {
        if let measureEnd { return Double(measureEnd - warmupEnd) / 1e9 }
        let last = results.map(\.lastCountedReply).max() ?? warmupEnd
        return last > warmupEnd ? Double(last - warmupEnd) / 1e9 : 0
    }()
    let percentile = { (p: Double) -> Double in
        guard counted > 0 else { return .nan }
        var rank = Int((Double(counted) * p / 100).rounded(.up))  // nearest rank
        rank = min(max(rank, 1), counted)
        return Double(latencies[rank - 1]) / 1000
    }
    let mean = counted > 0 ? Double(latencies.reduce(0, &+)) / Double(counted) / 1000 : .nan
    let cpuUser = cpuAfter.user - cpuBefore.user
    let cpuSystem = cpuAfter.system - cpuBefore.system

    var fields: [(String, String)] = []
    if let label = options.label { fields.append(("label", json(label))) }
    fields += [
        ("target", json("\(options.host):\(options.port)")),
        ("method", json(name)),
        ("connections", "\(options.connections)"),
        ("pipeline", "\(options.pipeline)"),
        ("threads", "\(options.threads)"),
        ("warmup_s", fixed(options.warmup, 3)),
        ("duration_s", fixed(elapsed, 3)),
        ("calls", "\(counted)"),
        ("calls_per_s", elapsed > 0 ? fixed(Double(counted) / elapsed, 1) : "null"),
        ("p50_us", fixed(percentile(50), 1)),
        ("p90_us", fixed(percentile(90), 1)),
        ("p99_us", fixed(percentile(99), 1)),
        ("max_us", fixed(percentile(100), 1)),
        ("mean_us", fixed(mean, 1)),
        ("errors", "\(errors)"),
        ("error_samples", "[" + samples.map(json).joined(separator: ", ") + "]"),
        ("warmup_calls", "\(results.reduce(0) { $0 + $1.warmupCalls })"),
        ("client_cpu_user_s", fixed(cpuUser, 3)),
        ("client_cpu_sys_s", fixed(cpuSystem, 3)),
        ("client_cpu_us_per_call", counted > 0 ? fixed((cpuUser + cpuSystem) * 1e6 / Double(counted), 2) : "null"),
    ]
    print("{" + fields.map { "\(json($0.0)): \($0.1)" }.joined(separator: ", ") + "}")
}

run()
