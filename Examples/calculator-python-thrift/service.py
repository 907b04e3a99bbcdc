"""calculator.Calculator (IDL/examples/calculator.thrift) as a Python Thrift function.

The Apus bootstrap imports this module and calls ``processor()`` (APUS_HANDLER=service.processor) to get the
Thrift processor it serves on $APUS_PORT, with the transport and protocol the manifest declares. The handler
is plain Python: one method per IDL method, called from several threads at once (one per connection with a call
in flight), so it keeps no shared mutable state.
"""

import os
import sys
import time

# The generated code (Scripts/gen-thrift) lives in gen/ beside this file.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

from calculator import Calculator  # noqa: E402
from calculator.ttypes import InvalidOperation, Operation  # noqa: E402

FUNCTION = os.environ.get("APUS_FUNCTION", "")
INSTANCE = os.environ.get("APUS_INSTANCE", "")

# slow() sleeps at most this long, whatever it is asked.
MAX_SLOW_MS = 60_000


class Handler(Calculator.Iface):
    def ping(self):
        pass

    def add(self, num1, num2):
        return _i32(num1 + num2)

    def calculate(self, logid, w):
        if w.op == Operation.ADD:
            value = w.num1 + w.num2
        elif w.op == Operation.SUBTRACT:
            value = w.num1 - w.num2
        elif w.op == Operation.MULTIPLY:
            value = w.num1 * w.num2
        elif w.op == Operation.DIVIDE:
            if w.num2 == 0:
                raise InvalidOperation(what=w.op, why="cannot divide by 0")
            value = int(w.num1 / w.num2)  # truncates toward zero, like C
        else:
            raise InvalidOperation(what=w.op if w.op is not None else 0, why="unknown operation")
        return _i32(value)

    def describe(self, flag, tiny, small, medium, large, real, text, blob):
        return "flag=%s tiny=%s small=%s medium=%s large=%s real=%r text=%s blob=%s" % (
            flag, tiny, small, medium, large, real, text, (blob or b"").hex())

    def roundtrip(self, value):
        return value

    def sum(self, values):
        return sum(values or ())

    def unique(self, words):
        return set(words or ())

    def histogram(self, words):
        counts = {}
        for word in words or ():
            counts[word] = counts.get(word, 0) + 1
        return counts

    def echo(self, data):
        return data

    def zap(self, id):
        print("zap %d" % id, flush=True)

    def slow(self, ms):
        time.sleep(max(0, min(ms, MAX_SLOW_MS)) / 1000.0)
        print("slow %d done" % ms, flush=True)
        return ms

    def whoami(self):
        return "%s/%s" % (FUNCTION, INSTANCE)

    def crash(self, message):
        raise RuntimeError(message)


def _i32(value):
    """Wrap to a signed 32-bit integer, as a C or Java server would."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def processor():
    """Called by the Apus bootstrap: the processor it serves."""
    return Calculator.Processor(Handler())
