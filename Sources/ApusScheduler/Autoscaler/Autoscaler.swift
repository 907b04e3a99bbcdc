import ApusCore
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// The autoscaler as a swift-service-lifecycle `Service`: once a second it samples every pool's load (requests in
/// flight plus waiting, ready instances, admitted requests), feeds it to that pool's `KPAScaler` and applies the
/// decision as the pool's instance floor. Demand above the floor is still met at once by the pools themselves
/// (instances start for queued requests); the floor keeps capacity through the stable window after a burst and
/// prewarms when the panic window sees a surge. Every change of decision is logged with its inputs.
public final class Autoscaler: Service {
    public struct Settings: Sendable {
        /// Share of `concurrency` each instance is sized for.
        public var targetUtilisation: Double
        public var stableWindow: Duration
        /// Idle time after the stable window empties before the last instance may go.
        public var scaleToZeroGrace: Duration
        public var interval: Duration

        public init(targetUtilisation: Double = 0.7, stableWindow: Duration = .seconds(60),
                    scaleToZeroGrace: Duration = .seconds(30), interval: Duration = .seconds(1)) {
            self.targetUtilisation = targetUtilisation
            self.stableWindow = stableWindow
            self.scaleToZeroGrace = scaleToZeroGrace
            self.interval = interval
        }

        /// Knative's ratio: the panic window is a tenth of the stable window (at least one sample interval).
        var panicWindow: Duration { max(interval, stableWindow / 10) }
    }

    private let scheduler: Scheduler
    private let settings: Settings
    private let logger: Logger
    private let scalers = Mutex<[ObjectIdentifier: KPAScaler]>([:])

    public init(scheduler: Scheduler, settings: Settings, logger: Logger) {
        self.scheduler = scheduler
        self.settings = settings
        self.logger = logger
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                self.tick(now: self.scheduler.clock.now)
                try? await self.scheduler.clock.sleep(for: self.settings.interval)
            }
        }
    }

    /// One round over all pools.
    func tick(now: ContinuousClock.Instant, wallClock: Date = Date()) {
        let pools = scheduler.allPools
        let live = Set(pools.map { ObjectIdentifier($0) })
        let (weekday, minute) = Self.weekdayAndMinute(wallClock)
        for pool in pools {
            // Scheduled minimums apply to versions the release routes to.
            let schedule = scheduler.isActive(pool.version) ? pool.version.manifest.scale.schedule : []
            let scheduledMinimum = ScheduledMinimum.minimum(schedule.map(ScheduledMinimum.init), weekday: weekday, minute: minute)
            let load = pool.sampleLoad()
            let poolConfiguration = pool.configuration
            var configuration = KPAScaler.Configuration(
                concurrency: poolConfiguration.concurrency, minInstances: poolConfiguration.minInstances,
                maxInstances: poolConfiguration.maxInstances)
            configuration.targetUtilisation = settings.targetUtilisation
            configuration.stableWindow = settings.stableWindow
            configuration.panicWindow = settings.panicWindow
            configuration.scaleToZeroGrace = settings.scaleToZeroGrace
            let id = ObjectIdentifier(pool)
            let (decision, previous) = scalers.withLock { scalers in
                var scaler = scalers[id] ?? KPAScaler(configuration: configuration, now: now)
                let previous = scaler.lastDecision?.desired
                scaler.reconfigure(configuration)
                scaler.record(concurrency: Double(load.inFlight + load.queued), now: now)
                let decision = scaler.decide(ready: load.ready, scheduledMinimum: scheduledMinimum, now: now)
                scalers[id] = scaler
                return (decision, previous)
            }
            pool.apply(decision)
            pool.recordScore(load)
            if decision.desired != previous ?? 0 || decision.panicking {
                logger.log(level: decision.desired != previous ?? 0 ? .info : .debug, "autoscaler decision", metadata: [
                    "function": "\(pool.version.function)", "version": "\(pool.version.number)",
                    "desired": "\(decision.desired)", "wanted": "\(decision.wanted)", "ready": "\(decision.ready)",
                    "stableConcurrency": "\(decision.stableConcurrency)", "panicConcurrency": "\(decision.panicConcurrency)",
                    "panicking": "\(decision.panicking)", "limitedBy": "\(decision.limitedBy ?? "-")",
                    "inFlight": "\(load.inFlight)", "queued": "\(load.queued)",
                    "requestsPerSecond": "\(Double(load.admitted) / max(0.001, Double(settings.interval.milliseconds) / 1000))",
                ])
            }
        }
        scalers.withLock { scalers in scalers = scalers.filter { live.contains($0.key) } }
    }

    /// ISO weekday (1 = Monday … 7 = Sunday) and minute of the day, in UTC.
    static func weekdayAndMinute(_ date: Date) -> (Int, Int) {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let parts = calendar.dateComponents([.weekday, .hour, .minute], from: date)
        let weekday = ((parts.weekday ?? 1) + 5) % 7 + 1  // Calendar: 1 = Sunday
        return (weekday, (parts.hour ?? 0) * 60 + (parts.minute ?? 0))
    }

}

/// Scores the autoscaler after the fact, one sample per second: *short* when requests had to wait for a slot
/// (capacity came too late), *idle* when ready capacity was more than twice the demand plus one instance (capacity
/// kept for nothing), *right* otherwise. Seconds with neither demand nor instances are not counted.
public struct ScalerScore: Sendable, Codable, Equatable {
    public var shortSeconds = 0
    public var idleSeconds = 0
    public var rightSeconds = 0

    public init() {}

    /// Share of counted seconds that were right-sized (1 when nothing was counted yet).
    public var rightShare: Double {
        let total = shortSeconds + idleSeconds + rightSeconds
        return total == 0 ? 1 : Double(rightSeconds) / Double(total)
    }

    mutating func record(_ load: InstancePool.Load, concurrency: Int) {
        let demand = load.inFlight + load.queued
        guard demand > 0 || load.ready > 0 else { return }
        if load.queued > 0 {
            shortSeconds += 1
        } else if load.ready * concurrency > 2 * demand + concurrency {
            idleSeconds += 1
        } else {
            rightSeconds += 1
        }
    }
}
