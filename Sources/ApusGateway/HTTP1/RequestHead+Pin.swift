import ApusCore
import ApusWire

extension RequestHead {
    /// The version `X-Apus-Version` pins, if any; a value that is not a positive number is refused.
    func pinnedVersionNumber() throws(ApusError) -> Int? {
        try VersionPin.parse(pinnedVersion, name: "X-Apus-Version")
    }
}
