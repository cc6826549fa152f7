"""The collector's pauses while a job runs: the heap frozen for the length of a run.

A job holds lm-eval's requests for as long as it runs (MMLU 5-shot: 56k instances, about 500k
objects the collector tracks). Every full collection walks them all while it holds the GIL:
~330 ms on a 2-core host, and in `serve` the event loop that takes online requests in waits
that long (`benchmarks/gc_pause.py`). They live until the run ends, so the collector has
nothing to find in them: `frozen_heap` moves what is tracked when a run starts into the
collector's permanent generation (`gc.freeze`, as vLLM's own server does after start-up with
`freeze_gc_heap`), and gives it back (`gc.unfreeze`) when the last run in the process ends,
so a finished job's cycles are collected as before. Objects made during the run are
collected as usual; frozen ones are still freed when their last reference goes.

NOTE: `gc.unfreeze` gives back all that is frozen (CPython freezes no subset), so in `serve`
the start-up heap vLLM's app froze is walked again after the last run, as it was before.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_num_runs = 0  # runs in this process inside `frozen_heap` (the pump may run several at once)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the collector's tracked heap for the length of the block (nests, and is safe
    from several threads: the heap is given back when the last block ends)."""
    global _num_runs
    with _lock:
        _num_runs += 1
        gc.freeze()  # NOTE: again on a nested run: its own job's requests are new
    try:
        yield
    finally:
        with _lock:
            _num_runs -= 1
            if _num_runs == 0:
                gc.unfreeze()
