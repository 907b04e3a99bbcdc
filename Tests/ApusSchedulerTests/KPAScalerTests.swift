import ApusCore
import Foundation
import Testing

@testable import ApusScheduler

@Suite("KPA autoscaler")
struct KPAScalerTests {
    /// concurrency 10 at 70% utilisation: 7 requests in flight per instance is the target.
    static func makeScaler(min: Int = 0, max: Int = 100, now: ContinuousClock.Instant) -> KPAScaler {
        KPAScaler(configuration: .init(concurrency: 10, minInstances: min, maxInstances: max), now: now)
    }

    /// Feeds one sample per second for `seconds` and decides after each; returns the last decision.
    @discardableResult
    static func feed(_ scaler: inout KPAScaler, concurrency: Double, seconds: Int, ready: (Int) -> Int, now: inout ContinuousClock.Instant) -> KPAScaler.Decision {
        var last: KPAScaler.Decision!
        for _ in 0..<seconds {
            now = now.advanced(by: .seconds(1))
            scaler.record(concurrency: concurrency, now: now)
            last = scaler.decide(ready: ready(last?.desired ?? 0), now: now)
        }
        return last
    }

    @Test func steadyLoadAsksForLoadOverTarget() {
        var now = ContinuousClock.now
        var scaler = Self.makeScaler(now: now)
        let decision = Self.feed(&scaler, concurrency: 35, seconds: 60, ready: { _ in 5 }, now: &now)
        #expect(decision.desired == 5)
        #expect(!decision.panicking)
        #expect(abs(decision.stableConcurrency - 35) < 0.01)
    }

    @Test func aBurstPanicsAndPanicNeverScalesDown() {
        var now = ContinuousClock.now
        var scaler = Self.makeScaler(now: now)
        Self.feed(&scaler, concurrency: 7, seconds: 60, ready: { _ in 1 }, now: &now)
        // Ten times the load: the 6 s window wants 10 instances against 1 ready.
        let burst = Self.feed(&scaler, concurrency: 70, seconds: 3, ready: { _ in 1 }, now: &now)
        #expect(burst.panicking)
        #expect(burst.desired >= 5, "\(burst)")
        let peak = Self.feed(&scaler, concurrency: 70, seconds: 6, ready: { $0 }, now: &now)
        #expect(peak.desired == 10, "\(peak)")
        // Load gone: still panicking, so no scale-down for a stable window after the last over-threshold second.
        let calm = Self.feed(&scaler, concurrency: 0, seconds: 30, ready: { $0 }, now: &now)
        #expect(calm.panicking && calm.desired == 10, "\(calm)")
        let after = Self.feed(&scaler, concurrency: 0, seconds: 40, ready: { $0 }, now: &now)
        #expect(!after.panicking)
        #expect(after.desired < 10, "\(after)")
    }

    @Test func scaleDownIsBoundedByTheRate() {
        var now = ContinuousClock.now
        var scaler = Self.makeScaler(now: now)
        Self.feed(&scaler, concurrency: 70, seconds: 60, ready: { _ in 10 }, now: &now)
        // Demand halves to a quarter: wanted 3, but at most halving per decision from 10 ready.
        let decision = Self.feed(&scaler, concurrency: 0, seconds: 61, ready: { _ in 10 }, now: &now)
        #expect(decision.desired == 5 && decision.limitedBy == "max scale-down rate", "\(decision)")
    }

    @Test func zeroOnlyAfterTheStableWindowEmptiesAndTheGrace() {
        var now = ContinuousClock.now
        var scaler = Self.makeScaler(now: now)
        Self.feed(&scaler, concurrency: 3, seconds: 5, ready: { _ in 1 }, now: &now)
        // Any demand left in the 60 s window keeps one instance.
        var decision = Self.feed(&scaler, concurrency: 0, seconds: 59, ready: { _ in 1 }, now: &now)
        #expect(decision.desired == 1 && decision.limitedBy == nil, "\(decision)")
        // The window is empty from here: one more grace period (30 s) with one instance.
        decision = Self.feed(&scaler, concurrency: 0, seconds: 29, ready: { _ in 1 }, now: &now)
        #expect(decision.desired == 1 && decision.limitedBy == "scale-to-zero grace", "\(decision)")
        decision = Self.feed(&scaler, concurrency: 0, seconds: 2, ready: { _ in 1 }, now: &now)
        #expect(decision.desired == 0, "\(decision)")
    }

    @Test func aFreshVersionWithoutDemandStaysAtZero() {
        var now = ContinuousClock.now
        var scaler = Self.makeScaler(now: now)
        let decision = Self.feed(&scaler, concurrency: 0, seconds: 5, ready: { _ in 0 }, now: &now)
        #expect(decision.desired == 0)
    }

    @Test func boundsAndScheduledMinimums() {
        var now = ContinuousClock.now
        var scaler = Self.makeScaler(min: 1, max: 4, now: now)
        var decision = Self.feed(&scaler, concurrency: 700, seconds: 10, ready: { _ in 4 }, now: &now)
        #expect(decision.desired == 4 && decision.limitedBy == "scale.max", "\(decision)")
        var quiet = Self.makeScaler(min: 1, max: 10, now: now)
        now = now.advanced(by: .seconds(1))
        quiet.record(concurrency: 0, now: now)
        decision = quiet.decide(ready: 1, now: now)
        #expect(decision.desired == 1 && decision.limitedBy == "scale.min")
        decision = quiet.decide(ready: 1, scheduledMinimum: 3, now: now)
        #expect(decision.desired == 3 && decision.limitedBy == "scheduled minimum")
    }

    @Test func scheduleWindows() {
        let weekdays = ScheduledMinimum(days: [1, 2, 3, 4, 5], start: 8 * 60, end: 20 * 60, min: 3)
        let nights = ScheduledMinimum(start: 22 * 60, end: 2 * 60, min: 2)
        #expect(weekdays.covers(weekday: 1, minute: 9 * 60))
        #expect(!weekdays.covers(weekday: 6, minute: 9 * 60), "Saturday")
        #expect(!weekdays.covers(weekday: 3, minute: 20 * 60), "the end is exclusive")
        #expect(nights.covers(weekday: 7, minute: 23 * 60) && nights.covers(weekday: 1, minute: 60))
        #expect(!nights.covers(weekday: 1, minute: 3 * 60))
        let friday = ScheduledMinimum(days: [5], start: 22 * 60, end: 2 * 60, min: 5)
        #expect(friday.covers(weekday: 6, minute: 30), "Friday night's window runs into Saturday")
        #expect(!friday.covers(weekday: 5, minute: 30), "but Thursday night is not Friday's")
        #expect(ScheduledMinimum.minimum([weekdays, nights], weekday: 2, minute: 10 * 60) == 3)
        #expect(ScheduledMinimum.minimum([weekdays, nights], weekday: 6, minute: 10 * 60) == 0)
    }

    @Test func manifestWindowsAndTheWallClock() throws {
        let window = ScheduledMinimum(FunctionManifest.Scale.Window(days: ["mon", "sun"], from: 60, to: 120, min: 2))
        #expect(window.days == [1, 7] && window.start == 60 && window.end == 120 && window.min == 2)
        // 2026-11-27 was a Friday; 07:20 UTC is minute 440.
        let friday = try #require(ISO8601DateFormatter().date(from: "2026-11-27T07:20:00Z"))
        #expect(Autoscaler.weekdayAndMinute(friday) == (5, 440))
        let sunday = try #require(ISO8601DateFormatter().date(from: "2026-11-29T23:59:00Z"))
        #expect(Autoscaler.weekdayAndMinute(sunday) == (7, 1439))
    }

    @Test func decisionsAreScoredAfterTheFact() {
        var score = ScalerScore()
        score.record(.init(inFlight: 0, queued: 0, ready: 0, admitted: 0), concurrency: 10)  // nothing there: not counted
        score.record(.init(inFlight: 10, queued: 3, ready: 1, admitted: 13), concurrency: 10)  // waited: short
        score.record(.init(inFlight: 2, queued: 0, ready: 5, admitted: 2), concurrency: 10)  // 50 slots for 2: idle
        score.record(.init(inFlight: 12, queued: 0, ready: 2, admitted: 12), concurrency: 10)  // right
        #expect(score == { var s = ScalerScore(); s.shortSeconds = 1; s.idleSeconds = 1; s.rightSeconds = 1; return s }())
        #expect(abs(score.rightShare - 1.0 / 3) < 0.001)
    }
}
