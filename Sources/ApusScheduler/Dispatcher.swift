import ApusCore

/// The protocol-blind step every caller of a function goes through after its edge decoded what routing needs:
/// from an `Invocation` to a `Dispatch` — the version (the caller's pin, or one chosen by the release's weights),
/// the check that the version serves the caller's protocol, the call's budget (the caller's, never past the
/// function's `timeout`) and deadline on the scheduler's clock, and the version's pool, where the caller takes a
/// slot. Used by the HTTP/1.1 handler, the HTTP/2 relay, gRPC calls, Thrift calls and asynchronous submissions
/// on each; the reactor keeps a per-loop cache of the same decisions for its hot path.
public struct Dispatcher: Sendable {
    public let scheduler: Scheduler

    public init(scheduler: Scheduler) {
        self.scheduler = scheduler
    }

    /// The version `invocation` goes to, checked against the caller's protocol (what an asynchronous submission
    /// needs: it runs later, under its own deadline).
    public func version(for invocation: Invocation, roll: Int) throws(ApusError) -> FunctionVersion {
        let version = try scheduler.catalog.route(function: invocation.function, pinnedVersion: invocation.pinnedVersion, roll: roll)
        let serves = version.manifest.protocol
        guard serves == invocation.callerProtocol else {
            throw ApusError(.wrongProtocol, "function \(invocation.function) serves \(serves.rawValue), not \(invocation.callerProtocol.rawValue); call it with a \(serves.rawValue) client")
        }
        return version
    }

    /// Where a call goes and by when it must be answered.
    public struct Dispatch: Sendable {
        public let version: FunctionVersion
        public let pool: InstancePool
        /// The time the call has: the caller's budget when shorter than the function's timeout.
        public let budget: Duration
        /// Whether `budget` is the caller's (not the function's timeout).
        public let budgetFromCaller: Bool
        public let deadline: ContinuousClock.Instant

        /// "function timeout of 30s" or "caller's timeout of 250ms", for deadline errors.
        public var budgetDescription: String {
            budgetFromCaller ? "caller's timeout of \(budget.humanReadable)" : "function timeout of \(budget.humanReadable)"
        }
    }

    /// Picks the version, checks its protocol and sets the deadline of `invocation`. `roll` (0..<100) chooses by
    /// release weight when nothing is pinned. Throws `.notFound` for an unknown function or version and
    /// `.wrongProtocol` when the version serves another protocol than the caller speaks.
    public func dispatch(_ invocation: inout Invocation, roll: Int) throws(ApusError) -> Dispatch {
        dispatch(&invocation, to: try version(for: invocation, roll: roll))
    }

    /// The budget, deadline and pool of `invocation` on `version` (chosen by `version(for:roll:)`, when the edge
    /// has more to decide between choosing the version and sending the call, such as an asynchronous submission).
    public func dispatch(_ invocation: inout Invocation, to version: FunctionVersion) -> Dispatch {
        var budget = version.manifest.timeout
        var fromCaller = false
        if let callerBudget = invocation.callerBudget, callerBudget < budget {
            budget = callerBudget
            fromCaller = true
        }
        let deadline = scheduler.clock.now.advanced(by: budget)
        invocation.deadline = deadline
        return Dispatch(version: version, pool: scheduler.pool(for: version), budget: budget, budgetFromCaller: fromCaller, deadline: deadline)
    }
}
