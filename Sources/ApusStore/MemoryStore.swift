import ApusCore
import Foundation
import Synchronization

/// A `Store` held in memory; for tests and throwaway runs.
public final class MemoryStore: Store {
    private struct State {
        var functions: [String: FunctionRecord] = [:]
        var versions: [String: [FunctionVersion]] = [:]
        var tokens: [String: APIToken] = [:]
    }

    private let state = Mutex(State())

    public init() {}

    public func createVersion(manifest: FunctionManifest, codeDigest: String, release: Bool, now: Date) throws(ApusError) -> (FunctionVersion, Release) {
        state.withLock { state in
            let name = manifest.name
            let number = (state.functions[name]?.latestVersion ?? 0) + 1
            let version = FunctionVersion(function: name, number: number, codeDigest: codeDigest, manifest: manifest, createdAt: now)
            state.versions[name, default: []].append(version)
            var record = state.functions[name] ?? FunctionRecord(
                name: name, latestVersion: 0,
                release: Release(function: name, weights: [], updatedAt: now), createdAt: now, updatedAt: now)
            record.latestVersion = number
            record.updatedAt = now
            if release || record.release.weights.isEmpty {
                record.release = Release(function: name, weights: [.init(version: number, weight: 100)], updatedAt: now)
            }
            state.functions[name] = record
            return (version, record.release)
        }
    }

    public func functions() throws(ApusError) -> [FunctionRecord] {
        state.withLock { $0.functions.values.sorted { $0.name < $1.name } }
    }

    public func function(named name: String) throws(ApusError) -> FunctionRecord? {
        state.withLock { $0.functions[name] }
    }

    public func versions(of name: String) throws(ApusError) -> [FunctionVersion] {
        _ = try requireFunction(name)
        return state.withLock { $0.versions[name] ?? [] }
    }

    public func version(_ number: Int, of name: String) throws(ApusError) -> FunctionVersion? {
        state.withLock { $0.versions[name]?.first { $0.number == number } }
    }

    public func setScale(of name: String, scale: ScaleOverride?, now: Date) throws(ApusError) -> FunctionRecord {
        try state.withLock { (state) throws(ApusError) -> FunctionRecord in
            guard var record = state.functions[name] else {
                throw ApusError(.notFound, "function \(name) does not exist")
            }
            record.scale = scale
            record.updatedAt = now
            state.functions[name] = record
            return record
        }
    }

    public func setRelease(of name: String, weights: [Release.Weight], now: Date) throws(ApusError) -> Release {
        try state.withLock { (state) throws(ApusError) -> Release in
            guard var record = state.functions[name] else {
                throw ApusError(.notFound, "function \(name) does not exist")
            }
            let existing = Set((state.versions[name] ?? []).map(\.number))
            try Release.validate(weights: weights, existingVersions: existing)
            record.release = Release(function: name, weights: weights, updatedAt: now)
            record.updatedAt = now
            state.functions[name] = record
            return record.release
        }
    }

    public func deleteFunction(named name: String) throws(ApusError) {
        try state.withLock { (state) throws(ApusError) in
            guard state.functions.removeValue(forKey: name) != nil else {
                throw ApusError(.notFound, "function \(name) does not exist")
            }
            state.versions[name] = nil
        }
    }

    public func createToken(_ token: APIToken) throws(ApusError) {
        try state.withLock { (state) throws(ApusError) in
            guard state.tokens[token.name] == nil else {
                throw ApusError(.conflict, "a token named \(token.name) exists already")
            }
            state.tokens[token.name] = token
        }
    }

    public func tokens() throws(ApusError) -> [APIToken] {
        state.withLock { $0.tokens.values.sorted { $0.name < $1.name } }
    }

    public func deleteToken(named name: String) throws(ApusError) -> APIToken {
        try state.withLock { (state) throws(ApusError) -> APIToken in
            guard let token = state.tokens.removeValue(forKey: name) else {
                throw ApusError(.notFound, "no token named \(name)")
            }
            return token
        }
    }
}
