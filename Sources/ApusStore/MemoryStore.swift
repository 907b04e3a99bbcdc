import ApusCore
import Foundation
import Synchronization

/// A `Store` held in memory; for tests and throwaway runs.
public final class MemoryStore: Store {
    private struct State {
        var functions: [String: FunctionRecord] = [:]
        var versions: [String: [FunctionVersion]] = [:]
        var tokens: [String: APIToken] = [:]
        /// By secret name, then key.
        var secrets: [String: [String: SealedSecret]] = [:]
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

    public func putSecret(_ secret: SealedSecret) throws(ApusError) -> Bool {
        state.withLock { state in
            let created = state.secrets[secret.name]?[secret.key] == nil
            state.secrets[secret.name, default: [:]][secret.key] = secret
            return created
        }
    }

    public func secretKeys() throws(ApusError) -> [SecretKeyInfo] {
        state.withLock { state in
            state.secrets.values.flatMap(\.values)
                .map { SecretKeyInfo(name: $0.name, key: $0.key, updatedAt: $0.updatedAt) }
                .sorted { ($0.name, $0.key) < ($1.name, $1.key) }
        }
    }

    public func sealedSecret(name: String, key: String) throws(ApusError) -> SealedSecret? {
        state.withLock { $0.secrets[name]?[key] }
    }

    public func deleteSecret(name: String, key: String?) throws(ApusError) {
        try state.withLock { (state) throws(ApusError) in
            guard var keys = state.secrets[name] else { throw ApusError(.notFound, "there is no secret \(name)") }
            if let key {
                guard keys.removeValue(forKey: key) != nil else { throw ApusError(.notFound, "secret \(name) has no key \(key)") }
                state.secrets[name] = keys.isEmpty ? nil : keys
            } else {
                state.secrets[name] = nil
            }
        }
    }
}
