import Foundation
import NIOCore
import NIOEmbedded
import Testing

@testable import ApusGateway

@Suite("Call deadlines")
struct CallDeadlinesTests {
    final class Call: DeadlineTarget {
        let deadline: ContinuousClock.Instant
        var deadlineSlot = -1
        var passed = 0

        init(in duration: Duration) {
            deadline = .now.advanced(by: duration)
        }

        func deadlinePassed() { passed += 1 }
    }

    @Test func onlyDueCallsPassAndTheRestStayKept() throws {
        let loop = EmbeddedEventLoop()
        let deadlines = CallDeadlines(eventLoop: loop)
        let soon = Call(in: .milliseconds(1))
        let late = Call(in: .seconds(3600))
        let finished = Call(in: .milliseconds(1))
        deadlines.add(late)
        deadlines.add(soon)
        deadlines.add(finished)
        deadlines.remove(finished)
        #expect(deadlines.count == 2)
        #expect(finished.deadlineSlot == -1)
        Thread.sleep(forTimeInterval: 0.005)
        loop.advanceTime(by: .milliseconds(10))
        #expect(soon.passed == 1)
        #expect(finished.passed == 0)
        #expect(late.passed == 0)
        #expect(deadlines.count == 1)
        #expect(late.deadlineSlot == 0)
        // Firing again later finds nothing else due.
        loop.advanceTime(by: .seconds(60))
        #expect(late.passed == 0)
        #expect(soon.passed == 1)
    }

    @Test func removalKeepsSlotsConsistent() {
        let loop = EmbeddedEventLoop()
        let deadlines = CallDeadlines(eventLoop: loop)
        let calls = (0..<5).map { _ in Call(in: .seconds(60)) }
        for call in calls { deadlines.add(call) }
        deadlines.remove(calls[1])
        deadlines.remove(calls[1])  // twice: no effect
        deadlines.remove(calls[4])
        #expect(deadlines.count == 3)
        for call in [calls[0], calls[2], calls[3]] {
            #expect(call.deadlineSlot >= 0 && call.deadlineSlot < 3)
        }
        #expect(Set([calls[0], calls[2], calls[3]].map(\.deadlineSlot)).count == 3)
    }
}
