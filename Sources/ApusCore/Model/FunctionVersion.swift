import Foundation

/// An immutable, numbered snapshot of a function: its manifest and the digest of its code archive.
public struct FunctionVersion: Codable, Hashable, Sendable {
    public var function: String
    public var number: Int
    /// `sha256:<hex>` of the uploaded tar.gz.
    public var codeDigest: String
    public var manifest: FunctionManifest
    public var createdAt: Date

    public init(function: String, number: Int, codeDigest: String, manifest: FunctionManifest, createdAt: Date) {
        self.function = function
        self.number = number
        self.codeDigest = codeDigest
        self.manifest = manifest
        self.createdAt = createdAt
    }
}

/// A function as the control plane knows it.
public struct FunctionRecord: Codable, Hashable, Sendable {
    public var name: String
    public var latestVersion: Int
    public var release: Release
    public var createdAt: Date
    public var updatedAt: Date
    /// Instance bounds set with `apus scale`, overriding every version's `scale.min`/`scale.max` (nil: none).
    public var scale: ScaleOverride?

    public init(name: String, latestVersion: Int, release: Release, createdAt: Date, updatedAt: Date, scale: ScaleOverride? = nil) {
        self.name = name
        self.latestVersion = latestVersion
        self.release = release
        self.createdAt = createdAt
        self.updatedAt = updatedAt
        self.scale = scale
    }
}

/// Instance bounds an operator sets for a function without deploying (`apus scale NAME --min --max`). Each bound
/// left nil keeps the manifest's value; the override applies to every version and survives restarts.
public struct ScaleOverride: Codable, Hashable, Sendable {
    public var min: Int?
    public var max: Int?

    public init(min: Int?, max: Int?) {
        self.min = min
        self.max = max
    }

    private enum CodingKeys: String, CodingKey { case min, max }

    /// Both bounds always appear, a bound left to the manifest as null.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(min, forKey: .min)
        try container.encode(max, forKey: .max)
    }

    /// The bounds `manifest.scale` becomes under this override. A minimum above the maximum is capped by it.
    public func apply(to scale: FunctionManifest.Scale) -> (min: Int, max: Int) {
        let max = self.max ?? scale.max
        return (Swift.min(self.min ?? scale.min, max), max)
    }

    /// Refuses bounds no manifest could have, naming the field; `latest` checks the pair the newest version gets.
    public func validate(against latest: FunctionManifest.Scale?) throws(ApusError) {
        if min == nil, max == nil {
            throw ApusError(.badRequest, "scale: give min, max or both (or clear the override)")
        }
        if let min, !(0...FunctionManifest.maxInstancesLimit).contains(min) {
            throw ApusError(.badRequest, "scale.min: must be 0...\(FunctionManifest.maxInstancesLimit) (got \(min))")
        }
        if let max, !(1...FunctionManifest.maxInstancesLimit).contains(max) {
            throw ApusError(.badRequest, "scale.max: must be 1...\(FunctionManifest.maxInstancesLimit) (got \(max))")
        }
        if let latest {
            let min = self.min ?? latest.min
            let max = self.max ?? latest.max
            if min > max {
                throw ApusError(.badRequest, "scale: min \(min) is above max \(max)\(self.max == nil ? " (the manifest's scale.max)" : self.min == nil ? " (min is the manifest's scale.min)" : "")")
            }
        }
    }
}
