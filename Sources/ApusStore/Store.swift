import ApusCore
import Foundation

/// Functions, their immutable versions and their releases, the control API's tokens and sealed secrets. Implementations must make each call atomic.
public protocol Store: Sendable {
    /// Records a new version of `manifest.name` (creating the function on first deploy). When `release` is true
    /// the new version takes 100% of traffic; otherwise the release stays as it is (the first version is always released).
    func createVersion(manifest: FunctionManifest, codeDigest: String, release: Bool, now: Date) throws(ApusError) -> (FunctionVersion, Release)
    func functions() throws(ApusError) -> [FunctionRecord]
    func function(named name: String) throws(ApusError) -> FunctionRecord?
    func versions(of name: String) throws(ApusError) -> [FunctionVersion]
    func version(_ number: Int, of name: String) throws(ApusError) -> FunctionVersion?
    func setRelease(of name: String, weights: [Release.Weight], now: Date) throws(ApusError) -> Release
    /// Sets (or, with nil, clears) the function's instance-bound override; returns the updated record.
    func setScale(of name: String, scale: ScaleOverride?, now: Date) throws(ApusError) -> FunctionRecord
    func deleteFunction(named name: String) throws(ApusError)

    // MARK: control-API tokens (only their SHA-256 is stored)

    /// Stores a new token; a token of the same name is a conflict.
    func createToken(_ token: APIToken) throws(ApusError)
    /// Every stored token, by name.
    func tokens() throws(ApusError) -> [APIToken]
    /// Removes the token of that name (revocation) and returns it; an unknown name is not found.
    func deleteToken(named name: String) throws(ApusError) -> APIToken

    // MARK: secrets (only sealed values: nonce, ciphertext and tag, see `SecretSealer`)

    /// Stores the sealed value of one key of a secret, replacing an earlier one; returns whether the key is new.
    func putSecret(_ secret: SealedSecret) throws(ApusError) -> Bool
    /// Every key of every secret, by name then key, without values.
    func secretKeys() throws(ApusError) -> [SecretKeyInfo]
    /// The sealed value of `key` in secret `name`, if stored.
    func sealedSecret(name: String, key: String) throws(ApusError) -> SealedSecret?
    /// Removes one key of a secret or, with nil, all of them; removing nothing is not found.
    func deleteSecret(name: String, key: String?) throws(ApusError)
}

extension Store {
    func requireFunction(_ name: String) throws(ApusError) -> FunctionRecord {
        guard let record = try function(named: name) else {
            throw ApusError(.notFound, "function \(name) does not exist")
        }
        return record
    }
}
