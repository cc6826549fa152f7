"""The arrival signal: how many online requests `serve` has admitted, shared with the engine.

`serve` numbers every online request it admits (`announce`, from 1) and tags the request with
its number (`overrides.ARRIVAL_KEY`), and the engine's scheduler settles a number once a step
schedules its request (`sched.arrivals.ArrivalBook`). The layer safepoints of an armed step
read the count: above the step's `cut_above`, some admitted request waits, and the step is
cut. It is a 16-byte file mapped into every process that opens it (the server, vLLM's engine
core and its worker): the count, and when the last arrival came (for the cut's latency). It
holds numbers and knows nothing of vLLM.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

from conserve_bench.faults import fault_hook

_FORMAT = "<q"  # one signed 64-bit integer per slot
_SLOT = struct.calcsize(_FORMAT)


class SharedInts:
    """A few 64-bit integers in a file mapped into memory, shared by every process that opens it.

    NOTE: the mapping is page aligned and every slot 8-byte aligned: a slot's copy is one
    store on the 64-bit platforms vLLM runs on, and a reader never sees half of a write.
    """

    def __init__(self, path: str | Path, count: int = 1):
        self.path, self.count = Path(path), count
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), count * _SLOT)

    @classmethod
    def create(cls, path: str | Path, value: int = 0, count: int = 1) -> "SharedInts":
        Path(path).write_bytes(struct.pack(_FORMAT, value) + bytes(_SLOT * (count - 1)))
        return cls(path, count)

    def read(self, slot: int = 0) -> int:
        return struct.unpack_from(_FORMAT, self._map, slot * _SLOT)[0]

    def write(self, value: int, slot: int = 0) -> None:
        struct.pack_into(_FORMAT, self._map, slot * _SLOT, value)

    def close(self) -> None:
        self._map.close()


def hooked_ints(hook: str) -> SharedInts | None:
    """The `SharedInts` file the fault suite steers this process through (`faults.HOOKS`),
    or None when the hook is not armed."""
    path = fault_hook(hook)
    return SharedInts(path) if path else None


class ArrivalSignal:
    """Online arrivals `serve` admitted: how many so far, and when the last one came
    (`time.monotonic_ns()`, one clock for every process on the machine). One writer: the
    server's event loop. Example:

        signal = ArrivalSignal.create_temporary()   # in serve; pass `signal.path` to the engine
        number = signal.announce()                  # an online request was admitted: 1, 2, ...
        ArrivalSignal(path).num_announced()          # in the engine
    """

    _COUNT, _LAST_NS = 0, 1

    def __init__(self, path: str | Path):
        self._ints = SharedInts(path, 2)
        self.path = self._ints.path

    @classmethod
    def create(cls, path: str | Path) -> "ArrivalSignal":
        SharedInts.create(path, count=2).close()
        return cls(path)

    @classmethod
    def create_temporary(cls) -> "ArrivalSignal":
        fd, path = tempfile.mkstemp(prefix="conserve-arrivals-", suffix=".bin")
        os.close(fd)
        return cls.create(path)

    def announce(self) -> int:
        """Count one more arrival; its number. NOTE: the time first, then the count that
        makes it visible: a reader that sees the new count sees its time."""
        number = self._ints.read(self._COUNT) + 1
        self._ints.write(time.monotonic_ns(), self._LAST_NS)
        self._ints.write(number, self._COUNT)
        return number

    def num_announced(self) -> int:
        return self._ints.read(self._COUNT)

    def last_arrival_ns(self) -> int:
        """When the last arrival was announced (0: none yet)."""
        return self._ints.read(self._LAST_NS)

    def remove(self) -> None:
        self._ints.close()
        self.path.unlink(missing_ok=True)
