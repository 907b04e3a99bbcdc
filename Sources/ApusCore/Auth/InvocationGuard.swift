/// Decides whether a caller may invoke a function whose manifest has `auth:`. The gateway asks it on every call to
/// such a function, on every edge, before anything is queued or sent; the control plane provides it.
public protocol InvocationGuard: Sendable {
    /// Throws `unauthenticated` (no credential, or one that does not verify) or `forbidden` (a valid credential
    /// that does not cover this function), with the reason. `credential` is what the caller sent: the value of
    /// `Authorization` (`Bearer <token>`). Returns true when the credential may stay in the request the instance
    /// gets (a JWT with `forward: true`); false when the gateway must remove it.
    func authorize(function: String, auth: FunctionManifest.AuthSettings, credential: String?) throws(ApusError) -> Bool
}

extension ApusError {
    /// `WWW-Authenticate` the gateway sends with a 401 (RFC 6750).
    public static let bearerChallenge = "Bearer realm=\"apus\""
}
