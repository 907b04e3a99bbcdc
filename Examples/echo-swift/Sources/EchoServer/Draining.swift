import Synchronization

/// Whether the server has begun its graceful shutdown. grpc-swift then fires every in-flight call's cancellation
/// handle, as a hint to wrap up; the echo service instead lets those calls finish (until the grace period runs out
/// and their tasks are cancelled), so it has to tell that hint from a client's cancel.
final class Draining: Sendable {
    private let flag = Atomic<Bool>(false)

    var isDraining: Bool {
        self.flag.load(ordering: .acquiring)
    }

    func begin() {
        self.flag.store(true, ordering: .releasing)
    }
}
