"""The arrival signal: one shared monotonic timestamp that says when online work last arrived.

`serve` stamps it whenever it admits an online request; the engine reads it at every layer
safepoint of an offline-only step and compares it with the time the step was planned, so
nobody ever has to clear a flag. It is an 8-byte file mapped into every process that opens it
(the server, vLLM's engine core and its worker). It holds one number and knows nothing of vLLM.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

_FORMAT = "<q"  # one signed 64-bit integer, at offset 0 of the file
_SIZE = struct.calcsize(_FORMAT)


class SharedInt:
    """A 64-bit integer in a file mapped into memory, shared by every process that opens it.

    NOTE: offset 0 of a mapping is page aligned, and an aligned 8-byte copy is one store on
    the 64-bit platforms vLLM runs on: a reader never sees half of a write.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _SIZE)

    @classmethod
    def create(cls, path: str | Path, value: int = 0) -> "SharedInt":
        Path(path).write_bytes(struct.pack(_FORMAT, value))
        return cls(path)

    def read(self) -> int:
        return struct.unpack_from(_FORMAT, self._map, 0)[0]

    def write(self, value: int) -> None:
        struct.pack_into(_FORMAT, self._map, 0, value)

    def close(self) -> None:
        self._map.close()


class ArrivalSignal:
    """When an online request last arrived: `time.monotonic_ns()` (one clock for every process
    on the machine), or 0 if none has yet. Example:

        signal = ArrivalSignal.create_temporary()   # in serve; pass `signal.path` to the engine
        signal.stamp()                              # an online request was admitted
        ArrivalSignal(path).last_arrival_ns()        # in the engine
    """

    def __init__(self, path: str | Path):
        self._value = SharedInt(path)
        self.path = self._value.path

    @classmethod
    def create_temporary(cls) -> "ArrivalSignal":
        fd, path = tempfile.mkstemp(prefix="conserve-arrivals-", suffix=".bin")
        os.close(fd)
        SharedInt.create(path).close()
        return cls(path)

    def stamp(self) -> None:
        self._value.write(time.monotonic_ns())

    def last_arrival_ns(self) -> int:
        return self._value.read()

    def remove(self) -> None:
        self._value.close()
        self.path.unlink(missing_ok=True)
