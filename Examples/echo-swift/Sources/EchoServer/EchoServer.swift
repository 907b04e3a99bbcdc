import GRPCCore
import GRPCNIOTransportHTTP2
import ServiceLifecycle

/// The gRPC server as a lifecycle `Service`: serves until graceful shutdown, then stops accepting calls and lets
/// the ones in flight finish. The `ServiceGroup` cancels it when that takes too long, which cancels those calls.
struct EchoServer: Service {
    let server: GRPCServer<HTTP2ServerTransport.Posix>
    let instance: String
    let draining = Draining()

    init(port: Int, instance: String) {
        let transport = HTTP2ServerTransport.Posix(
            address: .ipv4(host: "127.0.0.1", port: port),
            transportSecurity: .plaintext,
            config: .defaults { config in
                // Large-message tests send several MiB in one message; gRPC's default limit is 4 MiB.
                config.rpc.maxRequestPayloadSize = 64 * 1024 * 1024
            }
        )
        self.server = GRPCServer(
            transport: transport,
            services: [EchoService(instance: instance, draining: self.draining)]
        )
        self.instance = instance
    }

    func run() async throws {
        let server = self.server
        let draining = self.draining
        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask {
                    do {
                        try await server.serve()
                    } catch where Task.isCancelled {
                        // Forced shutdown: the group cancelled us after the grace period; not a failure.
                    }
                }
                do {
                    let port = try await server.listeningAddress?.ipv4?.port ?? 0
                    let instance = self.instance.isEmpty ? "" : " as \(self.instance)"
                    Console.out("echo-swift serving echo.Echo on 127.0.0.1:\(port)\(instance)")
                } catch where Task.isCancelled {
                    // Cancelled before the listener was bound.
                }
            }
        } onGracefulShutdown: {
            Console.out("echo-swift shutting down: no new calls, finishing the ones in flight")
            draining.begin()
            server.beginGracefulShutdown()
        }
    }
}
