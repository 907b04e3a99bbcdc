import ApusCore

/// Decides how many instances a function version should have, the way Knative's KPA does: observed concurrency
/// (requests in flight plus waiting) is averaged over a 60 s stable window and a 6 s panic window; the desired count
/// is that average divided by the per-instance target (`concurrency × utilisation`). When the panic window asks for
/// at least twice the ready instances the scaler panics: it follows the panic window and never scales down until a
/// whole stable window has passed without that condition. Steps are bounded (up: ×`maxScaleUpRate`, down:
/// ÷`maxScaleDownRate` of what is ready), the result honours `scale.min`/`max` and scheduled minimums, and zero is
/// reached only after the stable window has been empty for `scaleToZeroGrace`.
///
/// Pure: no clock of its own, every input carries `now`. One instance per function version.
public struct KPAScaler: Sendable {
    public typealias Instant = ContinuousClock.Instant

    public struct Configuration: Sendable, Equatable {
        /// Requests one instance serves at once (the manifest's `concurrency`).
        public var concurrency: Int
        /// Fraction of `concurrency` to aim for per instance.
        public var targetUtilisation: Double = 0.7
        public var stableWindow: Duration = .seconds(60)
        public var panicWindow: Duration = .seconds(6)
        /// Panic when the panic window wants this many times the ready instances.
        public var panicThreshold: Double = 2.0
        public var maxScaleUpRate: Double = 1000
        public var maxScaleDownRate: Double = 2
        public var minInstances: Int
        public var maxInstances: Int
        public var scaleToZeroGrace: Duration = .seconds(30)

        public init(concurrency: Int, minInstances: Int, maxInstances: Int) {
            self.concurrency = concurrency
            self.minInstances = minInstances
            self.maxInstances = maxInstances
        }

        /// Target concurrency per instance.
        public var target: Double { max(0.01, Double(concurrency) * targetUtilisation) }
    }

    /// One decision and everything it was made from (logged, and exposed for scoring).
    public struct Decision: Sendable, Equatable, CustomStringConvertible {
        public var at: Instant
        public var stableConcurrency: Double
        public var panicConcurrency: Double
        public var ready: Int
        public var panicking: Bool
        /// What the windows asked for before bounds.
        public var wanted: Int
        /// The result: instances that should exist.
        public var desired: Int
        /// Why `desired` differs from `wanted`, if it does.
        public var limitedBy: String?

        public var description: String {
            "desired=\(desired) wanted=\(wanted) ready=\(ready) stable=\(Self.format(stableConcurrency)) panic=\(Self.format(panicConcurrency))"
                + (panicking ? " panicking" : "") + (limitedBy.map { " limitedBy=\($0)" } ?? "")
        }

        private static func format(_ value: Double) -> String {
            String(Double(Int(value * 100)) / 100)
        }
    }

    public private(set) var configuration: Configuration
    private var samples: [(at: Instant, concurrency: Double)] = []
    private var panicSince: Instant?
    /// Since when the windows have asked for zero instances.
    private var zeroWantedSince: Instant?
    private var lastDesired = 0
    public private(set) var lastDecision: Decision?

    public init(configuration: Configuration, now: Instant) {
        self.configuration = configuration
        self.lastDesired = configuration.minInstances
    }

    public mutating func reconfigure(_ configuration: Configuration) {
        self.configuration = configuration
    }

    /// Records the concurrency observed now (in flight + waiting, summed over the gateways' reports).
    public mutating func record(concurrency: Double, now: Instant) {
        samples.append((now, max(0, concurrency)))
        let horizon = now - configuration.stableWindow
        if let firstKept = samples.firstIndex(where: { $0.at > horizon }), firstKept > 0 {
            samples.removeFirst(firstKept)
        }
    }

    /// The desired instance count now. `ready` is how many instances can serve; `scheduledMinimum` raises
    /// `scale.min` for the current window of a schedule (0 outside any).
    public mutating func decide(ready: Int, scheduledMinimum: Int = 0, now: Instant) -> Decision {
        let config = configuration
        let stable = average(over: config.stableWindow, now: now)
        let panic = average(over: config.panicWindow, now: now)
        let wantedStable = Int((stable / config.target).rounded(.up))
        let wantedPanic = Int((panic / config.target).rounded(.up))

        // Panic starts when the short window wants twice what is ready, and ends a stable window after it last did.
        let overThreshold = Double(wantedPanic) >= config.panicThreshold * Double(max(ready, 1)) && wantedPanic > 0
        if overThreshold {
            panicSince = now
        } else if let since = panicSince, now - since >= config.stableWindow {
            panicSince = nil
        }
        let panicking = panicSince != nil

        var wanted = panicking ? max(wantedPanic, lastDesired) : wantedStable
        var limitedBy: String?
        // Bounded steps relative to what is ready.
        if ready > 0 {
            let upperStep = Int((config.maxScaleUpRate * Double(ready)).rounded(.up))
            let lowerStep = Int((Double(ready) / config.maxScaleDownRate).rounded(.down))
            if wanted > upperStep {
                wanted = upperStep
                limitedBy = "max scale-up rate"
            } else if wanted < lowerStep {
                wanted = lowerStep
                limitedBy = "max scale-down rate"
            }
        }
        let requested = panicking ? max(wantedPanic, lastDesired) : wantedStable
        var desired = wanted
        let floor = max(config.minInstances, scheduledMinimum)
        // Zero only once the windows have asked for zero for a whole grace period.
        if desired == 0 {
            let since = zeroWantedSince ?? now
            zeroWantedSince = since
            if floor == 0, lastDesired > 0, now - since < config.scaleToZeroGrace {
                desired = 1
                limitedBy = "scale-to-zero grace"
            }
        } else {
            zeroWantedSince = nil
        }
        if desired < floor {
            desired = floor
            limitedBy = scheduledMinimum > config.minInstances ? "scheduled minimum" : "scale.min"
        }
        if desired > config.maxInstances {
            desired = config.maxInstances
            limitedBy = "scale.max"
        }
        lastDesired = desired
        let decision = Decision(at: now, stableConcurrency: stable, panicConcurrency: panic, ready: ready, panicking: panicking,
                                wanted: requested, desired: desired, limitedBy: limitedBy)
        lastDecision = decision
        return decision
    }

    /// Mean concurrency over the last `window`, counting seconds without samples as zero once samples exist.
    private func average(over window: Duration, now: Instant) -> Double {
        let since = now - window
        let inWindow = samples.filter { $0.at > since }
        guard !inWindow.isEmpty else { return 0 }
        // Each sample stands for one second of observation (gateways report every second); missing seconds in a
        // window that is already covered count as zero demand.
        let seconds = max(1, min(Int(window.components.seconds), Int((now - samples[0].at).components.seconds) + 1))
        return inWindow.reduce(0) { $0 + $1.concurrency } / Double(max(seconds, inWindow.count))
    }
}

/// Minimum instances for windows of the week (tidal traffic), e.g. weekdays 08:00–20:00 at least 3.
public struct ScheduledMinimum: Codable, Hashable, Sendable {
    /// Days the window applies: 1 = Monday … 7 = Sunday; empty means every day.
    public var days: Set<Int>
    /// Minutes after midnight (UTC) the window starts and ends; `end` may be before `start` (spans midnight).
    public var start: Int
    public var end: Int
    public var min: Int

    public init(days: Set<Int> = [], start: Int, end: Int, min: Int) {
        self.days = days
        self.start = start
        self.end = end
        self.min = min
    }

    /// The manifest's form (`scale.schedule` entries, days named mon…sun).
    public init(_ window: FunctionManifest.Scale.Window) {
        let names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        self.init(days: Set(window.days.compactMap { names.firstIndex(of: $0).map { $0 + 1 } }), start: window.from, end: window.to, min: window.min)
    }

    /// Whether the window covers `minuteOfWeek`-style inputs: ISO weekday (1–7) and minute of the day.
    public func covers(weekday: Int, minute: Int) -> Bool {
        if start <= end {
            return (days.isEmpty || days.contains(weekday)) && minute >= start && minute < end
        }
        // Spans midnight: the part before midnight belongs to `weekday`, the part after to the day before.
        let previous = weekday == 1 ? 7 : weekday - 1
        return (minute >= start && (days.isEmpty || days.contains(weekday))) || (minute < end && (days.isEmpty || days.contains(previous)))
    }

    /// The largest minimum among the windows that cover the moment.
    public static func minimum(_ windows: [ScheduledMinimum], weekday: Int, minute: Int) -> Int {
        windows.filter { $0.covers(weekday: weekday, minute: minute) }.map(\.min).max() ?? 0
    }
}
