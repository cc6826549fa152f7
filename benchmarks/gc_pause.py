"""The garbage collector's pauses beside a job's lm-eval requests, with the heap as lm-eval
leaves it and frozen (`gc.freeze`), side by side in one process.

`serve` runs its offline pump in the API server's process. The pump holds the job's lm-eval
requests (MMLU 5-shot: 56k instances) for as long as the job runs; a full collection walks
them all while it holds the GIL, and the event loop that takes online requests in waits. This
builds the requests as a job does (lm-eval's tasks from `--data-dir`), then per mode:

- the time of a full collection (`gc.collect()`, median of 5);
- an event loop (this thread) sleeping 1 ms at a time while another thread keeps what a
  running job keeps (a small result per item, `--items` of them: enough for the collector's
  next full pass): the loop's largest stall and how many stalls over 50 ms, as an online
  request arriving then would wait.

    python -m benchmarks.gc_pause          # about a minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import threading
import time
from typing import Any

from benchmarks.common import REPO, add_measured_args, measure_host, write_measured

STALL_MS = 50.0


def build_requests(data_dir: str, task: str, num_fewshot: int) -> list[Any]:
    """lm-eval's instances of `task`, built as a job builds them."""
    from lm_eval.tasks import get_task_dict

    from conserve_bench.jobs.taskspec import task_manager

    instances = []
    for leaf in _leaves(get_task_dict([task], task_manager(data_dir))):
        leaf.set_config(key="num_fewshot", value=num_fewshot)
        leaf.build_all_requests(rank=0, world_size=1)
        instances += leaf.instances
    return instances


def _leaves(tasks: dict):
    for value in tasks.values():
        yield from _leaves(value) if isinstance(value, dict) else (value,)


def collect_ms(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def loop_stalls(num_items: int) -> dict[str, float]:
    """The event loop's stalls while another thread keeps `num_items` result objects."""
    done = threading.Event()

    def keep_results():
        kept = []
        for i in range(num_items):
            kept.append({"key": f"item-{i}", "result": [float(i), True]})
            if i % 500 == 0:
                time.sleep(0.001)  # NOTE: a job's results come between engine steps
        done.set()

    async def watch() -> list[float]:
        stalls = []
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append((time.perf_counter() - t0) * 1e3 - 1.0)
        return stalls

    thread = threading.Thread(target=keep_results)
    gc.collect()
    thread.start()
    stalls = asyncio.run(watch())
    thread.join()
    return {"max_stall_ms": max(stalls), "num_stalls_over_50ms": sum(s > STALL_MS for s in stalls)}


def measure(frozen: bool, num_items: int) -> dict[str, float]:
    """Frozen as a job's run freezes it (`jobs.heap.frozen_heap`)."""
    from conserve_bench.jobs.heap import frozen_heap

    with frozen_heap() if frozen else contextlib.nullcontext():
        return {"collect_ms": collect_ms(), **loop_stalls(num_items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mmlu"))
    parser.add_argument("--task", default="mmlu")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--items", type=int, default=None,
                        help="Result objects the other thread keeps per run [a third of the "
                             "objects the collector tracks: CPython's next full collection "
                             "comes once new long-lived objects reach a quarter of the old]")
    add_measured_args(parser, "gc_pause")
    args = parser.parse_args()
    host = measure_host(args)
    requests = build_requests(args.data_dir, args.task, args.num_fewshot)
    gc.collect()
    tracked = len(gc.get_objects())
    args.items = args.items or tracked // 3  # NOTE: each result is two tracked objects
    result: dict[str, Any] = {"num_requests": len(requests), "tracked_objects": tracked}
    # NOTE: twice in alternation, so a slow stretch of the host is not one mode's alone
    runs = [(mode, measure(mode == "frozen", args.items)) for _ in range(2) for mode in ("plain", "frozen")]
    for mode in ("plain", "frozen"):
        mine = [r for m, r in runs if m == mode]
        result[mode] = {key: max(r[key] for r in mine) if key != "collect_ms"
                        else statistics.median(r[key] for r in mine) for key in mine[0]}
    print(result)
    write_measured("gc_pause", result, args, host)


if __name__ == "__main__":
    main()
