/// A request's pinned version (`X-Apus-Version`, gRPC/THeader `apus-version`, the control API's `version`): a
/// positive version number, or refused with the reason. One rule for every protocol.
public enum VersionPin {
    /// The number `text` pins, nil when there is no pin; `name` is how the caller spelled the field.
    public static func parse(_ text: String?, name: String) throws(ApusError) -> Int? {
        guard let text else { return nil }
        guard let number = Int(text), number > 0 else {
            throw ApusError(.badRequest, "\(name) must be a version number (got \(text.prefix(32)))")
        }
        return number
    }
}
