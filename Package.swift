// swift-tools-version:6.1
// Apus: a function-as-a-service platform that serves functions as first-class RPC services.
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

/// The data path checks exclusivity statically; skip the dynamic checks in release builds of the hot modules.
let hotPathSettings: [SwiftSetting] = swiftSettings + [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

/// The wire module's parsers run inside the edge's and the sidecar's loops: let their callers inline them.
let wireSettings: [SwiftSetting] = hotPathSettings + [
    .unsafeFlags(["-cross-module-optimization"], .when(configuration: .release)),
]

let package = Package(
    name: "apus",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "apusd", targets: ["apusd"]),
        .executable(name: "apus", targets: ["apus"]),
        .executable(name: "apus-example-echo", targets: ["apus-example-echo"]),
        .executable(name: "apus-sidecar", targets: ["apus-sidecar"]),
        .executable(name: "apus-sandbox-init", targets: ["apus-sandbox-init"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.1.0"),
        // Per-function invocation auth: JWT verification against a function's JWKS.
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.7.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        // Only for the Swift gRPC example function (Examples/echo-swift).
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
    ],
    targets: [
        // Protocol-neutral model: invocation, function/version/release, manifest, neutral errors, clocks.
        .target(
            name: "ApusCore",
            dependencies: [
                .product(name: "Yams", package: "Yams"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Persistent state: the Store seam with SQLite (GRDB) and in-memory implementations, code artifacts.
        .target(
            name: "ApusStore",
            dependencies: [
                "ApusCore",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // C shims for GNU-only process APIs (pipe2, posix_spawn chdir).
        .target(name: "CApusShims"),
        // The instance's first and last step before its code: cgroup join, privilege drop, seccomp (C, no Swift
        // runtime: it runs inside the sandbox, where only /usr is mounted).
        .executableTarget(
            name: "apus-sandbox-init",
            exclude: ["README.md"],
            cSettings: [.unsafeFlags(["-Wall", "-Wextra", "-Werror"])],
            // Static: it must run inside any root file system, where neither the Swift runtime SwiftPM links in nor
            // the host's libraries need be.
            linkerSettings: [.unsafeFlags(["-static-executable"])]
        ),
        // Service mesh: the registry protocol and model, the embedded registry, its HTTP client, and etcd.
        .target(
            name: "ApusMesh",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Metrics export: swift-metrics as Prometheus text with a help line per family.
        .target(
            name: "ApusTelemetry",
            dependencies: [
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Node agent: launches function instances as (sandboxed) child processes per the runtime contract.
        .target(
            name: "ApusRuntime",
            dependencies: [
                "ApusCore",
                "CApusShims",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            exclude: ["README.md"],
            resources: [.copy("Bootstrap")],
            swiftSettings: swiftSettings
        ),
        // Data plane: per-version instance pools, concurrency slots, bounded deadline queues, scale from zero.
        .target(
            name: "ApusScheduler",
            dependencies: [
                .product(name: "Metrics", package: "swift-metrics"),
                "ApusCore",
                "ApusRuntime",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: hotPathSettings
        ),
        // The wire formats the edge and the sidecar read and write themselves: HTTP/1.1 heads, the response reader,
        // chunked bodies, gRPC framing and timeouts, Thrift transports and envelopes. NIOCore only.
        .target(
            name: "ApusWire",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: wireSettings
        ),
        // The edge: HTTP/1.1, HTTP/2 (h2c, upgrade, TLS with ALPN) and gRPC; routing by path prefix, host or gRPC
        // service, release-weighted version choice, proxying to instances.
        .target(
            name: "ApusGateway",
            dependencies: [
                "ApusWire",
                .product(name: "Metrics", package: "swift-metrics"),
                "ApusCore",
                "ApusScheduler",
                "CApusShims",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: hotPathSettings
        ),
        // Asynchronous long tasks: durable store (own SQLite file, group commit), state machine, dispatcher.
        .target(
            name: "ApusTasks",
            dependencies: [
                "ApusCore",
                "ApusScheduler",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Control plane: REST/JSON API for deploy, versions, releases, logs.
        .target(
            name: "ApusControl",
            dependencies: [
                .product(name: "Metrics", package: "swift-metrics"),
                "ApusCore",
                "ApusStore",
                "ApusScheduler",
                "ApusRuntime",
                "ApusMesh",
                "ApusTasks",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                "ApusTelemetry",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                // Token hashing (SHA-256) and task progress capabilities (HMAC).
                .product(name: "Crypto", package: "swift-crypto"),
                // Per-function invocation auth: JWTs parsed by jwt-kit, signatures (RSA too) checked by swift-crypto.
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "apusd",
            dependencies: [
                "ApusCore", "ApusStore", "ApusRuntime", "ApusScheduler", "ApusGateway", "ApusControl", "ApusTelemetry", "ApusMesh",
                "ApusTasks", "apus-sandbox-init",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "apus",
            dependencies: [
                "ApusCore",
                "ApusMesh",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
                // Trusting an API's own certificate (APUS_CACERT).
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: swiftSettings
        ),
        // Example gRPC function written on grpc-swift-2: serves IDL/examples/echo.proto on $APUS_PORT.
        .executableTarget(
            name: "apus-example-echo",
            dependencies: [
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Examples/echo-swift/Sources/EchoServer",
            swiftSettings: swiftSettings
        ),
        // Thrift load client for Scripts/bench-thrift: Calculator.add over framed strict binary, encoded by hand.
        .executableTarget(
            name: "apus-bench-thrift",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "Benchmarks/thrift/LoadClient",
            swiftSettings: swiftSettings
        ),
        // Per-call cost of the control API's token check and the gateway's `auth:` checks, for Scripts/bench-auth.
        .executableTarget(
            name: "apus-bench-auth",
            dependencies: [
                "ApusControl", "ApusCore", "ApusStore",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Benchmarks/auth",
            swiftSettings: swiftSettings
        ),
        // The mesh sidecar's proxy, policies (balancing, retries, breaker, outlier ejection, limits) and config.
        .target(
            name: "ApusSidecarCore",
            dependencies: [
                "ApusMesh",
                "ApusWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Yams", package: "Yams"),
            ],
            path: "Sidecar/Sources/ApusSidecarCore",
            swiftSettings: hotPathSettings
        ),
        .executableTarget(
            name: "apus-sidecar",
            dependencies: [
                "ApusSidecarCore", "ApusMesh", "ApusTelemetry",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sidecar/Sources/ApusSidecar",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusSidecarTests",
            dependencies: [
                "ApusSidecarCore", "ApusMesh", "ApusWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusCoreTests",
            dependencies: ["ApusCore"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusRuntimeTests",
            dependencies: ["ApusRuntime", "ApusCore", .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusStoreTests",
            dependencies: ["ApusStore", "ApusCore"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusWireTests",
            dependencies: [
                "ApusWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusGatewayTests",
            dependencies: [
                "ApusGateway", "ApusWire", "ApusCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusControlTests",
            dependencies: [
                "ApusControl", "ApusMesh", "ApusScheduler",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusMeshTests",
            dependencies: ["ApusMesh", .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusTasksTests",
            dependencies: ["ApusTasks", "ApusCore", "ApusScheduler"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ApusSchedulerTests",
            dependencies: ["ApusScheduler", "ApusCore", "ApusRuntime", .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
