#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import ServiceLifecycle

/// An Apus `runtime: command` function written with grpc-swift-2: serves `echo.Echo` over plaintext HTTP/2 on
/// `127.0.0.1:$APUS_PORT` (any free port when unset) and answers as `$APUS_INSTANCE`. SIGTERM or SIGINT: stop
/// accepting calls, give those in flight `gracePeriod` to finish, then cancel them; the exit status is 0 either way.
@main
enum EchoApp {
    /// Below apusd's default `--stop-grace` (5 s), after which the whole process group is killed.
    static let gracePeriod: Duration = .seconds(3)

    static func main() async {
        let environment = ProcessInfo.processInfo.environment
        let port: Int
        if let value = environment["APUS_PORT"] {
            guard let parsed = Int(value), (0...65_535).contains(parsed) else {
                Console.error("echo-swift: APUS_PORT must be a port number, got '\(value)'")
                exit(2)
            }
            port = parsed
        } else {
            port = 0
        }
        let instance = environment["APUS_INSTANCE"] ?? ""

        var configuration = ServiceGroupConfiguration(
            services: [.init(service: EchoServer(port: port, instance: instance))],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: Logger(label: "echo-swift")
        )
        configuration.maximumGracefulShutdownDuration = gracePeriod
        do {
            try await ServiceGroup(configuration: configuration).run()
            Console.out("echo-swift stopped")
        } catch {
            Console.error("echo-swift: \(error)")
            exit(1)
        }
    }
}
