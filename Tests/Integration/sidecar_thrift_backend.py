"""A Thrift Calculator endpoint for the sidecar's Thrift tests (IDL/examples/calculator.thrift), run as its own
process under Debian's python3 with python3-thrift:

    /usr/bin/python3 sidecar_thrift_backend.py PORT NAME framed|buffered

`describe` answers with NAME (so a test sees which endpoint served it); the other methods are the example's.
Prints "ready" once it listens.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Examples" / "calculator-python-thrift" / "gen"))

from calculator import Calculator  # noqa: E402
from thrift.protocol import TBinaryProtocol  # noqa: E402
from thrift.server import TServer  # noqa: E402
from thrift.transport import TSocket, TTransport  # noqa: E402


class Handler(Calculator.Iface):
    def __init__(self, name):
        self.name = name

    def ping(self):
        pass

    def add(self, num1, num2):
        return num1 + num2

    def describe(self, flag, tiny, small, medium, large, real, text, blob):
        return self.name


if __name__ == "__main__":
    port, name, transport = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    factory = TTransport.TFramedTransportFactory() if transport == "framed" else TTransport.TBufferedTransportFactory()
    socket = TSocket.TServerSocket(host="127.0.0.1", port=port)
    server = TServer.TThreadedServer(Calculator.Processor(Handler(name)), socket, factory,
                                     TBinaryProtocol.TBinaryProtocolFactory(), daemon=True)
    socket.listen()
    print("ready", flush=True)
    server.serve()
