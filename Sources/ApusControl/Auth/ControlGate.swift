import ApusCore
import Foundation
import HTTPTypes
import Hummingbird
import Logging

/// The control API's front door, run on every routed request before its handler:
///
/// 1. mutating calls (`POST`/`PUT`/`PATCH`/`DELETE`) must name the API in `Host` and carry no foreign `Origin`
///    (403), and send JSON where the route takes JSON (415): cross-site requests and DNS rebinding stop here;
/// 2. the bearer token is looked up (`TokenAuthority`) and the route's rule (`APIPolicy.rules`) checked: 401 with
///    `WWW-Authenticate: Bearer` for a missing, unknown or expired token, 403 naming the scope a route needs;
/// 3. every mutating call leaves one audit line (`apus.audit`): token, method, path and the status answered.
///
/// A task's progress route also takes the task's capability (`?capability=`) instead of a token.
struct ControlGate: RouterMiddleware {
    typealias Context = ControlRequestContext

    let authority: TokenAuthority
    let policy: APIPolicy
    let audit: Logger

    static let wwwAuthenticate = HTTPField.Name("WWW-Authenticate")!
    static let origin = HTTPField.Name("Origin")!

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        context.authenticationEnabled = true
        let mutating = APIPolicy.isMutating(request.method)
        // An unknown path or method answers 404 whoever asks (the routes are public in the OpenAPI document).
        guard let route = context.endpointPath, route != "NotFound" else { return try await next(request, context) }
        let rule = policy.rule(method: request.method, route: route)
        context.verdict = authority.authenticate(authorization: request.headers[.authorization])
        let response: Response
        do {
            if mutating {
                let host = request.head.authority  // HTTP/1.1's Host
                try policy.checkHost(host)
                try policy.checkOrigin(request.headers[Self.origin], host: host)
                try policy.checkContentType(request.headers[.contentType], body: rule.body)
            }
            try authorize(rule.access, request: request, context: context)
            response = try await next(request, context)
        } catch let error as ApusError {
            var refused = ControlAPI.errorResponse(error)
            if error.code == .unauthenticated { refused.headers[Self.wwwAuthenticate] = "Bearer realm=\"apus\"" }
            response = refused
        }
        if mutating {
            audit.info("api call", metadata: [
                "token": "\(context.token?.name ?? (isProgressCapability(request, context) ? "capability" : "-"))",
                "method": "\(request.method.rawValue)", "path": "\(request.uri.path)", "status": "\(response.status.code)",
            ])
        }
        return response
    }

    func isProgressCapability(_ request: Request, _ context: Context) -> Bool {
        guard context.endpointPath == "/v1/tasks/{id}/progress", let id = context.parameters.get("id"),
              let capability = request.uri.queryParameters["capability"] else { return false }
        return authority.isProgressCapability(String(capability), for: id)
    }

    func authorize(_ access: APIAccess, request: Request, context: Context) throws(ApusError) {
        if access == .open { return }
        if isProgressCapability(request, context) { return }
        guard let token = context.token else {
            throw ApusError(.unauthenticated, context.verdict.problem ?? "this call needs a bearer token")
        }
        let service = context.parameters.get("service")?.removingPercentEncoding
        guard access.allows(token.scopes, service: service) else {
            throw ApusError(.forbidden, "token \(token.name) (scopes: \(token.scopes.map(\.description).joined(separator: ", "))) may not \(request.method.rawValue) \(request.uri.path): this needs scope \(access.needed(service: service))")
        }
    }
}
