/// Where an instance serves: an IPv4 address and a port. Loopback for instances in apusd's own network namespace;
/// the instance's end of its link (10.213.x.y) when it has a namespace of its own. Eight bytes, copied freely on the
/// request path.
public struct InstanceEndpoint: Sendable, Hashable, CustomStringConvertible {
    /// The address in host byte order (127.0.0.1 is 0x7F00_0001).
    public var address: UInt32
    public var port: Int

    public init(address: UInt32, port: Int) {
        self.address = address
        self.port = port
    }

    /// `127.0.0.1:port`.
    public static func loopback(port: Int) -> InstanceEndpoint {
        InstanceEndpoint(address: 0x7F00_0001, port: port)
    }

    /// The address as dotted decimal ("127.0.0.1").
    public var host: String { Self.format(address) }

    public var description: String { "\(host):\(port)" }

    public static func format(_ address: UInt32) -> String {
        "\(address >> 24).\((address >> 16) & 0xFF).\((address >> 8) & 0xFF).\(address & 0xFF)"
    }

    /// Parses dotted decimal ("10.213.0.2"); nil for anything else.
    public static func parse(_ text: String) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy({ $0.isASCII && $0.isNumber }), let byte = UInt32(part), byte <= 255 else {
                return nil
            }
            value = value << 8 | byte
        }
        return value
    }
}
