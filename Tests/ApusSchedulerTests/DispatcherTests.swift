import ApusCore
import ApusScheduler
import Foundation
import Logging
import Testing

/// The dispatcher on a manual clock: version choice (pin or release roll), the protocol check, the budget and the
/// deadline, and the pool it hands the caller.
@Suite("dispatcher")
struct DispatcherTests {
    /// `f` with version 1 (HTTP, timeout 10 s) and version 2 (HTTP, timeout 2 s) released 90/10, and `g`, a gRPC
    /// function.
    static func makeDispatcher(clock: ManualClock) -> Dispatcher {
        let catalog = FunctionCatalog()
        func version(_ function: String, _ number: Int, timeout: Duration, protocol: FunctionManifest.WireProtocol = .http) -> FunctionVersion {
            let manifest = FunctionManifest(name: function, runtime: .python3, handler: "main.handler", protocol: `protocol`,
                                            scale: .init(min: 0, max: 1), timeout: timeout)
            return FunctionVersion(function: function, number: number, codeDigest: "sha256:\(function)\(number)", manifest: manifest, createdAt: Date())
        }
        catalog.update(.init(
            record: FunctionRecord(name: "f", latestVersion: 2,
                                   release: Release(function: "f", weights: [.init(version: 1, weight: 90), .init(version: 2, weight: 10)], updatedAt: Date()),
                                   createdAt: Date(), updatedAt: Date()),
            versions: [version("f", 1, timeout: .seconds(10)), version("f", 2, timeout: .seconds(2))]))
        catalog.update(.init(
            record: FunctionRecord(name: "g", latestVersion: 1,
                                   release: Release(function: "g", weights: [.init(version: 1, weight: 100)], updatedAt: Date()),
                                   createdAt: Date(), updatedAt: Date()),
            versions: [version("g", 1, timeout: .seconds(5), protocol: .grpc)]))
        let scheduler = Scheduler(
            configuration: .init(), catalog: catalog, launcher: InstancePoolTests.FakeLauncher(),
            codeDirectory: { _ in URL(fileURLWithPath: "/nonexistent") }, logger: Logger(label: "test"), clock: clock)
        return Dispatcher(scheduler: scheduler)
    }

    static func invocation(_ function: String, pinned: Int? = nil, speaks: FunctionManifest.WireProtocol = .http,
                           budget: Duration? = nil) -> Invocation {
        Invocation(requestID: "r", function: function, pinnedVersion: pinned, method: "GET", path: "/",
                   callerProtocol: speaks, callerBudget: budget)
    }

    @Test func releaseWeightsDecideByRollAndAPinOverrides() throws {
        let dispatcher = Self.makeDispatcher(clock: ManualClock())
        for roll in [0, 45, 89] { #expect(try dispatcher.version(for: Self.invocation("f"), roll: roll).number == 1) }
        for roll in [90, 99] { #expect(try dispatcher.version(for: Self.invocation("f"), roll: roll).number == 2) }
        #expect(try dispatcher.version(for: Self.invocation("f", pinned: 2), roll: 0).number == 2)
        #expect(throws: ApusError.self) { try dispatcher.version(for: Self.invocation("f", pinned: 3), roll: 0) }
        #expect(throws: ApusError.self) { try dispatcher.version(for: Self.invocation("nope"), roll: 0) }
    }

    @Test func aFunctionOfAnotherProtocolIsRefusedWithItsProtocolNamed() {
        let dispatcher = Self.makeDispatcher(clock: ManualClock())
        do {
            _ = try dispatcher.version(for: Self.invocation("g"), roll: 0)
            Issue.record("an HTTP call to a gRPC function was dispatched")
        } catch {
            #expect(error.code == .wrongProtocol)
            #expect(error.message == "function g serves grpc, not http; call it with a grpc client")
        }
        #expect(throws: Never.self) { try dispatcher.version(for: Self.invocation("g", speaks: .grpc), roll: 0) }
    }

    @Test func theBudgetIsTheCallersWhenShorterAndTheDeadlineIsOnTheClock() throws {
        let clock = ManualClock()
        let dispatcher = Self.makeDispatcher(clock: clock)
        clock.advance(by: .seconds(100))

        var plain = Self.invocation("f", pinned: 1)
        let full = try dispatcher.dispatch(&plain, roll: 0)
        #expect(full.budget == .seconds(10) && !full.budgetFromCaller)
        #expect(full.deadline == clock.now.advanced(by: .seconds(10)))
        #expect(plain.deadline == full.deadline)
        #expect(full.budgetDescription == "function timeout of 10s")

        var short = Self.invocation("f", pinned: 1, budget: .milliseconds(250))
        let capped = try dispatcher.dispatch(&short, roll: 0)
        #expect(capped.budget == .milliseconds(250) && capped.budgetFromCaller)
        #expect(capped.deadline == clock.now.advanced(by: .milliseconds(250)))
        #expect(capped.budgetDescription == "caller's timeout of 250ms")

        // A caller's budget longer than the function's timeout does not extend it.
        var long = Self.invocation("f", pinned: 2, budget: .seconds(60))
        let limited = try dispatcher.dispatch(&long, roll: 0)
        #expect(limited.budget == .seconds(2) && !limited.budgetFromCaller)

        // The pool is the version's, the one the scheduler keeps.
        #expect(full.pool === dispatcher.scheduler.pool(for: full.version))
        #expect(limited.pool !== full.pool)
    }
}
