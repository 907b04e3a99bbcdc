import ApusCore
import ApusRuntime
import Testing

@Suite("--prewarm settings")
struct PrewarmSettingsTests {
    @Test func countsPerRuntime() throws {
        #expect(try PrewarmSettings.parseCounts(["python3=2"]) == ["python3": 2])
        #expect(try PrewarmSettings.parseCounts([]) == [:])
        #expect(try PrewarmSettings.parseCounts(["python3=1", "python3=0"]) == ["python3": 0])
    }

    @Test(arguments: [
        ("python3", "expected RUNTIME=COUNT"),
        ("python3=-1", "COUNT from 0 to 64"),
        ("python3=many", "expected RUNTIME=COUNT"),
        ("command=2", "runtime command cannot be prewarmed"),
        ("ruby=1", "unknown runtime ruby"),
    ])
    func badValuesSayWhatIsWrong(value: String, message: String) {
        do {
            _ = try PrewarmSettings.parseCounts([value])
            Issue.record("\(value) was accepted")
        } catch {
            #expect(error.message.contains(message), "\(error.message)")
        }
    }
}
