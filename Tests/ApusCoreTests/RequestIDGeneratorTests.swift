import Testing

@testable import ApusCore

@Suite("request ids")
struct RequestIDGeneratorTests {
    @Test func idsArePrefixAndCounterInBase36() {
        let generator = RequestIDGenerator()
        var prefix: Substring?
        for expected in 1...5000 {
            let id = generator.next()
            let parts = id.split(separator: "-")
            #expect(parts.count == 3 && parts[0] == "r" && parts[1].count == 6, "\(id)")
            if prefix == nil { prefix = parts[1] }
            #expect(parts[1] == prefix, "one prefix per generator")
            #expect(Int(parts[2], radix: 36) == expected && parts[2] == String(expected, radix: 36), "\(id)")
        }
    }

    @Test func generatorsHaveTheirOwnPrefixes() {
        let a = RequestIDGenerator().next(), b = RequestIDGenerator().next()
        #expect(a != b)
    }
}
