import ApusCore
import Hummingbird

/// The request context of the control API: Hummingbird's core storage and what `ControlGate` learnt of the caller.
public struct ControlRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    /// What the caller's `Authorization` header proved; `.missing` until the gate has looked (and always when the
    /// API runs without a `TokenAuthority`, as unit tests of single routes do).
    public var verdict: TokenAuthority.Verdict = .missing
    /// False when the API runs without authentication (a router built without a `TokenAuthority`).
    public var authenticationEnabled = false

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
    }

    /// The caller's valid token, if any.
    public var token: APIToken? { verdict.token }

    /// Whether the caller may act on anything (admin, or authentication switched off).
    public var isAdmin: Bool { !authenticationEnabled || (token?.scopes.contains(.admin) ?? false) }
}
