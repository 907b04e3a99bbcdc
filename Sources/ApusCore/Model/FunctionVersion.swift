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

    public init(name: String, latestVersion: Int, release: Release, createdAt: Date, updatedAt: Date) {
        self.name = name
        self.latestVersion = latestVersion
        self.release = release
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}
