extension FunctionCatalog {
    /// The function registered in the mesh under `service` (`mesh.service`), if any: the gateway routes HTTP
    /// requests whose `Host` is that name to it. Cheap when no function is in the mesh.
    public func function(servingMeshService service: some StringProtocol) -> String? {
        guard anyMeshServices else { return nil }
        return meshFunction(String(service))
    }

    /// What the mesh publisher registers: for each mesh service, the function and the manifest of the version the
    /// release sends most traffic to (its protocol picks the gateway port), with the catalog's generation.
    public func meshRegistrations() -> (generation: UInt64, services: [String: (function: String, protocol: FunctionManifest.WireProtocol)]) {
        let (generation, map) = meshSnapshot
        var services: [String: (String, FunctionManifest.WireProtocol)] = [:]
        for (service, function) in map {
            guard let entry = entry(function) else { continue }
            let number = entry.record.release.weights.max { $0.weight < $1.weight }?.version ?? entry.record.latestVersion
            guard let manifest = entry.versions[number]?.manifest ?? entry.versions[entry.record.latestVersion]?.manifest else { continue }
            services[service] = (function, manifest.protocol)
        }
        return (generation, services)
    }
}

import ApusCore
