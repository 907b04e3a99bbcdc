import ApusCore
import ApusScheduler
import Foundation
import Testing

@Suite("catalog routing")
struct CatalogTests {
    func version(_ n: Int) -> FunctionVersion {
        FunctionVersion(function: "f", number: n, codeDigest: "sha256:x",
                        manifest: FunctionManifest(name: "f", runtime: .python3, handler: "main.handler"), createdAt: Date())
    }

    @Test func routesByWeightAndPin() throws {
        let catalog = FunctionCatalog()
        let release = Release(function: "f", weights: [.init(version: 1, weight: 90), .init(version: 2, weight: 10)], updatedAt: Date())
        catalog.update(.init(record: FunctionRecord(name: "f", latestVersion: 2, release: release, createdAt: Date(), updatedAt: Date()),
                             versions: [version(1), version(2)]))
        #expect(try catalog.route(function: "f", pinnedVersion: nil, roll: 5).number == 1)
        #expect(try catalog.route(function: "f", pinnedVersion: nil, roll: 95).number == 2)
        #expect(try catalog.route(function: "f", pinnedVersion: 2, roll: 5).number == 2)
        #expect(throws: ApusError(.notFound, "function f has no version 9")) { try catalog.route(function: "f", pinnedVersion: 9) }
        #expect(throws: ApusError(.notFound, "no function named g")) { try catalog.route(function: "g", pinnedVersion: nil) }
        catalog.remove("f")
        #expect(throws: ApusError.self) { try catalog.route(function: "f", pinnedVersion: nil) }
    }

    @Test func changeCountMovesOnEveryUpdateAndRemoval() {
        let catalog = FunctionCatalog()
        let release = Release(function: "f", weights: [.init(version: 1, weight: 100)], updatedAt: Date())
        let entry = FunctionCatalog.Entry(
            record: FunctionRecord(name: "f", latestVersion: 1, release: release, createdAt: Date(), updatedAt: Date()),
            versions: [version(1)])
        let start = catalog.changeCount
        catalog.update(entry)
        let afterUpdate = catalog.changeCount
        #expect(afterUpdate > start)
        #expect(catalog.changeCount == afterUpdate)  // reading does not move it
        catalog.update(entry)
        #expect(catalog.changeCount > afterUpdate)
        let beforeRemoval = catalog.changeCount
        catalog.remove("f")
        #expect(catalog.changeCount > beforeRemoval)
    }
}
