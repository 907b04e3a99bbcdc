"""greeter.Greeter (IDL/examples/greeter.thrift) as a Python Thrift function, served with the compact protocol.

The Apus bootstrap imports this module and calls ``processor()`` (APUS_HANDLER=service.processor).
"""

import os
import sys

# The generated code (Scripts/gen-thrift) lives in gen/ beside this file.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

from greeter import Greeter  # noqa: E402

GREETING = os.environ.get("GREETING", "Hello")


class Handler(Greeter.Iface):
    def greet(self, name):
        return "%s, %s!" % (GREETING, name)


def processor():
    """Called by the Apus bootstrap: the processor it serves."""
    return Greeter.Processor(Handler())
