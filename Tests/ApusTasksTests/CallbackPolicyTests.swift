import ApusTasks
import Testing

@Suite("callback policy")
struct CallbackPolicyTests {
    let node = [IPNetwork(parsing: "192.0.2.10")!, IPNetwork(parsing: "2001:db8::10")!]

    @Test(arguments: [
        "http://127.0.0.1:7070/v1/functions", "http://127.200.0.1/", "http://[::1]:8080/", "http://169.254.169.254/latest",
        "http://0.0.0.0:7070/", "http://[fe80::1]/", "http://224.0.0.1/", "http://[::ffff:127.0.0.1]/",
        "http://192.0.2.10:9000/", "http://[2001:db8::10]/", "http://localhost:7070/", "http://api.localhost/",
    ])
    func theNodeItselfIsRefused(url: String) {
        let policy = CallbackPolicy(allowed: [], ownAddresses: node)
        #expect(policy.refusal(for: url, resolve: false) != nil)
    }

    @Test(arguments: ["https://hooks.example.com/x", "http://10.1.2.3/", "http://[2001:db8::11]/", "http://192.0.2.11/"])
    func elsewhereIsAllowed(url: String) {
        #expect(CallbackPolicy(allowed: [], ownAddresses: node).refusal(for: url, resolve: false) == nil)
    }

    @Test func theAllowListAdmitsHostsAndNetworks() throws {
        let policy = try CallbackPolicy.parse(["127.0.0.0/8", "localhost", "fd00::/8"]).get()
        #expect(policy.refusal(for: "http://127.0.0.1:9/", resolve: false) == nil)
        #expect(policy.refusal(for: "http://localhost:9/", resolve: false) == nil)
        #expect(policy.refusal(for: "http://169.254.169.254/", resolve: false) != nil)
    }

    @Test(arguments: ["10.0.0.0/33", "not a host", "::1/129", "a/b"])
    func badAllowEntriesAreRefused(entry: String) {
        guard case .failure(let error) = CallbackPolicy.parse([entry]) else {
            Issue.record("accepted \(entry)")
            return
        }
        #expect(error.message.contains("--callback-allow"))
    }

    @Test func networksContainTheirAddresses() {
        let net = IPNetwork(parsing: "10.64.0.0/10")!
        #expect(net.contains(IPAddress(parsing: "10.127.255.255")!))
        #expect(!net.contains(IPAddress(parsing: "10.128.0.0")!))
        #expect(!net.contains(IPAddress(parsing: "::ffff:10.64.0.1")!), "v4 and v6 are different families")
        #expect(IPNetwork(parsing: "0.0.0.0/0")!.contains(IPAddress(parsing: "8.8.8.8")!))
    }
}
