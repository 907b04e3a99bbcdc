extension FunctionManifest {
    /// What an instance's network namespace may reach besides the calls apusd makes to it (`network: {egress: …}`).
    public enum Egress: String, Codable, Hashable, Sendable, CaseIterable {
        /// The outside world through the node, never the node's own addresses (its loopback services, the control
        /// API, the link-local metadata range) or other instances; the instance's sidecar too, when it has one.
        case all
        /// Only the instance's own sidecar (`mesh.sidecar: true`): calls to other services by name, nothing else.
        case mesh
        /// Nothing at all: the instance only answers.
        case none
    }

    /// `network: {egress: all | mesh | none}`; nil in the manifest means `all`.
    public struct NetworkSettings: Codable, Hashable, Sendable {
        public var egress: Egress

        public init(egress: Egress = .all) {
            self.egress = egress
        }
    }

    /// The egress the function gets (`all` unless `network.egress` says otherwise).
    public var egress: Egress { network?.egress ?? .all }

    static func parseNetwork(_ reader: ManifestReader, mesh: MeshSettings?) throws(ApusError) -> NetworkSettings? {
        guard let mapping = try reader.optionalMapping("network") else { return nil }
        let network = ManifestReader(mapping: mapping, path: "network")
        try network.rejectUnknownKeys(allowed: ["egress"])
        guard let text = try network.optionalString("egress") else { return NetworkSettings() }
        guard let egress = Egress(rawValue: text) else {
            throw ManifestReader.failure("network.egress", "must be one of all, mesh, none (got \"\(text.prefix(80))\")")
        }
        if egress == .mesh, mesh?.sidecar != true {
            throw ManifestReader.failure("network.egress", "mesh reaches only the function's sidecar: it needs mesh.sidecar: true (or use none)")
        }
        return NetworkSettings(egress: egress)
    }
}
