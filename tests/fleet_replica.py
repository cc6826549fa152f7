"""One fake-engine replica of a fleet, for tests/test_fleet.py: `serve`'s offline pump on a
`FakeEngine`, in a process of its own, until SIGTERM (it drains, as `serve` does) or SIGKILL.

    python -m tests.fleet_replica URL --lease-s 2 --heartbeat-s 0.5 --step-s 0.01 --poison KEY
"""

from __future__ import annotations

import argparse
import signal
import threading

from conserve_bench.config import DEFAULT_MODEL, LeaseConfig, RunConfig
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.serve.pump import OfflinePump
from conserve_bench.store import Store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--lease-s", type=float, default=30.0)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--max-inflight", type=int, default=8)
    parser.add_argument("--items-per-step", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=0.01)
    parser.add_argument("--poison", action="append", default=[])
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = Store(args.url, LeaseConfig(args.lease_s, args.heartbeat_s, args.max_attempts))
    engine = FakeEngine(items_per_step=args.items_per_step, step_s=args.step_s, poisoned=args.poison)
    pump = OfflinePump(store, engine, RunConfig(max_inflight=args.max_inflight), output_dir=None,
                       label="fake replica", model=DEFAULT_MODEL)  # its task jobs' model
    pump.start()
    stop.wait()
    pump.stop()


if __name__ == "__main__":
    main()
