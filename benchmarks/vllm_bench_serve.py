"""Online latency under co-serving, measured by vLLM's own benchmark client.

Per policy (default online-only, priority, conserve with its default targets): a fresh
`conserve-bench serve` with its own job store (this machine's latency profile copied in from
`--db`), an MMLU 5-shot job submitted behind (`--data-dir`, the local CSVs) and running, then
`vllm.benchmarks.serve` called from Python (the CPU build's `vllm` console script is broken):
random dataset, `--input-len` prompt tokens, `--output-len` out, Poisson `--request-rate`,
`--num-prompts` requests. A policy given again runs again, as `<policy>#2`: online-only twice
(an A/A run) measures how far two runs of one setting differ on this host, the noise any
ratio must be told from; alternated (`online-only,conserve,online-only,conserve`, the same
seed: the same prompts at the same offsets), each policy's runs are also pooled, so a slow
spell of the host falls on both policies' requests rather than on one run. Reports TTFT and TPOT p50/p99 and offline items/s (the server's
`conserve_offline_items_total` over the benchmark's duration) per policy, and the P99 ratios
to online-only with a 95% bootstrap interval from the one run (`bench`'s `tail_intervals`, on
the per-request times vLLM's client keeps with `--save-detailed`), as a markdown table and
JSON in `--out` and benchmarks/measured/vllm_bench_serve.json.

vLLM 0.32.0 names relied on (tests/test_bench.py checks them): `vllm.benchmarks.serve`
(`add_cli_args(parser)`, `async main_async(args) -> dict` with `p50_ttft_ms`, `p99_ttft_ms`,
`p50_tpot_ms`, `p99_tpot_ms`, `completed`, `failed`, `duration`) and
`vllm.utils.argparse_utils.FlexibleArgumentParser`.

    python -m benchmarks.vllm_bench_serve                   # 60 prompts at 0.25 req/s per policy
    python -m benchmarks.vllm_bench_serve --policies online-only,conserve,online-only   # with A/A
    python -m benchmarks.vllm_bench_serve --policies online-only,conserve,online-only,conserve  # pooled
    python -m benchmarks.vllm_bench_serve --num-prompts 4 --request-rate 1 --input-len 32 \
        --output-len 8 --offline-limit 2 --no-profile --measured /tmp/vllm-bench-serve.json   # tiny
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

from benchmarks.common import add_measured_args, host_profile, write_measured
from conserve_bench.bench.tables import interval_text
from conserve_bench.config import ServePolicy

POLICIES = (ServePolicy.ONLINE_ONLY, ServePolicy.PRIORITY, ServePolicy.CONSERVE)
METRICS = ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(p.value for p in POLICIES))
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--offline-tasks", default="mmlu")
    parser.add_argument("--offline-limit", type=int, default=50, help="Questions per subject (0: all).")
    parser.add_argument("--serve-arg", action="append", default=[], help="Extra `serve` flag.")
    parser.add_argument("--out", default=None, help="Folder [results/vllm-bench-serve-<time>].")
    add_served_args(parser)
    add_measured_args(parser, "vllm_bench_serve")
    return parser.parse_args()


def add_served_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a fresh `serve` with a job behind it and vLLM's client in front, the same
    in every benchmark that runs one: model, its latency profile, the job's data and shots,
    the client's requests."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--request-rate", type=float, default=0.25)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--data-dir", default=os.environ.get("CONSERVE_BENCH_DATA", "../shared/data/mmlu"))
    parser.add_argument("--db", default=os.environ.get("CONSERVE_BENCH_DB", "sqlite:///conserve.db"),
                        help="Where this machine's latency profile is kept (measured into it first, unless --no-profile).")


def serve_args(policy: ServePolicy, folder: Path, args, profiles) -> tuple[str, list[str]]:
    """A fresh server's store and flags: its own store in `folder` with this machine's profile
    copied in (`profiles`: `bench.phases.ProfileCache`), its output and step log there too."""
    db_url = f"sqlite:///{(folder / 'jobs.db').resolve()}"
    profiles.copy_to(db_url)
    return db_url, ["--policy", policy.value, "--db", db_url, "--output", str(folder), "--model", args.model,
                    "--data-dir", os.path.abspath(args.data_dir), "--step-log", str(folder / "steps.jsonl")]


def vllm_bench_args(args, url: str, model_path: str, served_name: str) -> argparse.Namespace:
    """The arguments of `vllm bench serve`, parsed by vLLM's own parser."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", served_name, "--tokenizer", model_path,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--request-rate", str(args.request_rate), "--burstiness", "1.0", "--seed", str(args.seed),
        "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99", "--disable-tqdm", "--save-detailed",
    ])


def online_records(result: dict) -> list:
    """vLLM's per-request times (`--save-detailed`) as `bench`'s records, for its intervals."""
    from conserve_bench.bench.summary import OnlineRecord

    # NOTE: one gap per chunk vLLM's client received (a chunk may carry more than one token)
    return [OnlineRecord(index=i, arrival_s=0.0, context_tokens=0, generated_tokens=len(itl) + 1,
                         ttft_s=None if error else ttft, tbt_s=tuple(itl), error=error or None)
            for i, (ttft, itl, error) in enumerate(zip(result["ttfts"], result["itls"], result["errors"]))]


def server_counters(url: str) -> dict[str, float]:
    """One read of the server's `/metrics`: its offline items committed so far
    (`bench.loadgen.parse_counters`) and its API process's stalls (`parse_api_stalls`)."""
    import httpx

    from conserve_bench.bench.loadgen import parse_counters

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {"items": parse_counters(text)["items"], **parse_api_stalls(text)}


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's API process (the OpenAI app, the pump, the client
    side of vLLM's engine) and of its children (vLLM's engine core: the forward pass)."""
    import psutil

    def used(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    server = psutil.Process(pid)
    return {"api": used(server), "engine": sum(used(child) for child in server.children(recursive=True))}


def parse_api_stalls(metrics_text: str) -> dict[str, float]:
    """The API process's counters so far (`serve.metrics.ProcessWatch`): its event loop's
    wakes, those over 50 ms late, and the collector's full (generation 2) passes and their
    seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, s.labels.get("le"), s.labels.get("generation")): s.value
               for family in text_string_to_metric_families(metrics_text) for s in family.samples}
    wakes = samples.get(("conserve_api_loop_stall_seconds_count", None, None), 0.0)
    return {"loop_wakes": wakes,
            "loop_stalls_over_50ms": wakes - samples.get(("conserve_api_loop_stall_seconds_bucket", "0.05", None), 0.0),
            "gc2_passes": samples.get(("conserve_api_gc_pause_seconds_count", None, "2"), 0.0),
            "gc2_s": samples.get(("conserve_api_gc_pause_seconds_sum", None, "2"), 0.0)}


def labelled(policies: str) -> list[tuple[str, ServePolicy]]:
    """(label, policy) in run order; a policy's second run is labelled `<policy>#2`, and so on
    (`bench --rounds`'s labels: `PolicyRun.in_round`)."""
    from conserve_bench.bench.setting import PolicyRun

    runs: list[tuple[str, ServePolicy]] = []
    for name in policies.split(","):
        policy = ServePolicy(name)
        num = 1 + sum(1 for _, p in runs if p == policy)
        runs.append((PolicyRun(policy.value, policy).in_round(num).label, policy))
    return runs


def run_policy(args, policy: ServePolicy, out: Path, profiles, label: str | None = None) -> tuple[dict, list]:
    """One fresh server: the eval job running behind, vLLM's benchmark in front. Returns the
    policy's row and its online requests' records (kept under `out`/`label`)."""
    from vllm.benchmarks.serve import main_async

    from conserve_bench.bench.phases import wait_running
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.errors import ConserveError
    from conserve_bench.serve.client import JobClient
    from conserve_bench.serve.process import ServerProcess

    phase_dir = out / (label or policy.value)
    phase_dir.mkdir(parents=True)
    db_url, flags = serve_args(policy, phase_dir, args, profiles)
    with ServerProcess([*flags, *args.serve_arg], phase_dir) as server:
        profiles.learn_from(db_url)
        jobs = JobClient(server.url, timeout_s=600)
        job = jobs.submit(args.offline_tasks.split(","), limit=args.offline_limit or None,
                          num_fewshot=args.num_fewshot, data_dir=os.path.abspath(args.data_dir))
        if policy != ServePolicy.ONLINE_ONLY:
            wait_running(jobs, job["id"])
        before, cpu_before, t0 = server_counters(server.url), cpu_seconds(server.proc.pid), time.perf_counter()
        result = asyncio.run(main_async(vllm_bench_args(args, server.url, resolve_model(args.model).path,
                                                        args.model)))
        cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(server.proc.pid).items()}
        counted = {k: v - before[k] for k, v in server_counters(server.url).items()}
        items = counted.pop("items")  # NOTE: the rest are the API process's stalls
        wall_s = time.perf_counter() - t0
        with contextlib.suppress(ConserveError):  # a job that finished cannot be cancelled
            jobs.cancel(job["id"])
        log_lines = server.log_tail(10**6).splitlines()
        targets_line = next((line for line in log_lines if "conserve:" in line or "online targets:" in line), "")
        warm_line = next((line for line in log_lines if "warm start" in line), "")
    profiles.keep_refit(db_url)
    (phase_dir / "vllm_bench_serve.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return {**{m: result.get(m) for m in METRICS}, "completed": result.get("completed"),
            "failed": result.get("failed"), "duration_s": result.get("duration"),
            "offline_items": items, "offline_items_per_s": items / result["duration"],
            "bench_wall_s": wall_s, "serve_targets": targets_line.split("WARNING")[-1].strip(),
            "warm_start": warm_line.split("WARNING")[-1].strip() or None,
            "api_stalls": counted, "cpu_share": {k: v / wall_s for k, v in cpu.items()},
            **step_errors(phase_dir / "steps.jsonl")}, online_records(result)


def step_errors(path: Path) -> dict:
    """The live latency model's error on the phase's steps (conserve's plan; none for the
    other policies) and the floor under it: steps of one shape against their median."""
    from conserve_bench.bench.summary import StepRecord, prediction_errors
    from conserve_bench.sched.steplog import read_step_log_with_notes

    steps = [StepRecord.from_log(sample, notes, 0.0) for sample, notes in read_step_log_with_notes(path)]
    return prediction_errors(steps, (50, 90))


def with_ratios(runs: dict[str, tuple[dict, list]]) -> dict[str, dict]:
    """Rows with their ratios to (the first) online-only's: the four metrics, and the P99s of
    TTFT, ITL (vLLM's inter-token latency, `bench`'s TBT) and TPOT with a 95% bootstrap
    interval; a second online-only run's are the A/A ratios, 1 but for the host's noise."""
    from conserve_bench.bench.summary import tail_intervals

    rows = {policy: row for policy, (row, _) in runs.items()}
    base = rows.get(ServePolicy.ONLINE_ONLY.value)  # NOTE: rows are keyed by the plain string
    for policy, (row, records) in runs.items():
        row["vs_online_only"] = None if base is None else {
            m: (row[m] / base[m] if row[m] and base[m] else None) for m in METRICS}
        row["tail_intervals"] = None if base is None else tail_intervals(
            records, runs[ServePolicy.ONLINE_ONLY.value][1])
    return rows


def pooled(runs: dict[str, tuple[dict, list]], policy_of: dict[str, ServePolicy]) -> dict[str, dict]:
    """Per policy run more than once (`policy_of`: each run label's, from `labelled`), all its
    runs' requests against all of online-only's: the P99 ratios with their bootstrap
    intervals. Empty when no policy ran twice."""
    from conserve_bench.bench.summary import tail_intervals

    by_policy: dict[str, list] = {}
    counts: dict[str, int] = {}
    for label, (_, records) in runs.items():
        policy = policy_of[label].value
        by_policy.setdefault(policy, []).extend(records)
        counts[policy] = counts.get(policy, 0) + 1
    base = by_policy.get(ServePolicy.ONLINE_ONLY.value)
    if base is None or max(counts.values()) < 2:
        return {}
    return {policy: {"runs": counts[policy], "requests": sum(r.completed for r in records),
                     "tail_intervals": tail_intervals(records, base)}
            for policy, records in by_policy.items() if policy != ServePolicy.ONLINE_ONLY.value}


def markdown(rows: dict[str, dict], args, pools: dict[str, dict] | None = None) -> str:
    lines = [f"vLLM's benchmark client (`vllm.benchmarks.serve`): random {args.input_len}-token prompts, "
             f"{args.output_len} tokens out, Poisson {args.request_rate:g} req/s, {args.num_prompts} "
             f"prompts; offline: {args.offline_tasks} {args.num_fewshot}-shot behind.", "",
             "| policy | TTFT p50/p99 ms | TPOT p50/p99 ms | offline items/s | TTFT p99 / online-only "
             "| TPOT p99 / online-only | prediction error p50/p90 | same-shape spread p50/p90 |",
             "|---|---|---|---|---|---|---|---|"]
    for policy, r in rows.items():
        ratio = r["vs_online_only"] or {}
        intervals = r.get("tail_intervals") or {}  # NOTE: records before 2026-12-06 have none
        lines.append(f"| {policy} | {r['p50_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} | "
                     f"{r['p50_tpot_ms']:.0f}/{r['p99_tpot_ms']:.0f} | {r['offline_items_per_s']:.2f} | "
                     f"{_x(ratio.get('p99_ttft_ms'), intervals.get('ttft_ms.p99'))} | "
                     f"{_x(ratio.get('p99_tpot_ms'), intervals.get('tpot_ms.p99'))} | "
                     f"{_pcts(r.get('prediction_rel_error'))} | {_pcts(r.get('shape_spread_rel'))} |")
    starts = [f"{policy}: {_start(r['warm_start'])}" for policy, r in rows.items()
              if "warm_start" in r and policy.startswith("conserve")]  # NOTE: recorded from 2026-12-07
    if starts:
        lines += ["", "Where each conserve server started (`serve --warm-start`): " + "; ".join(starts) + "."]
    if pools:
        lines += ["", "Each policy's runs pooled, against online-only's pooled:", "",
                  "| policy | runs | requests | P99 TTFT x online-only [95% CI] | P99 ITL x online-only [95% CI] "
                  "| P99 TPOT x online-only [95% CI] |", "|---|---|---|---|---|---|"]
        for policy, pool in pools.items():
            t = pool["tail_intervals"]
            lines.append(f"| {policy} | {pool['runs']} | {pool['requests']} | {_x(None, t['ttft_ms.p99'])} | "
                         f"{_x(None, t['tbt_ms.p99'])} | {_x(None, t['tpot_ms.p99'])} |")
    if any("api_stalls" in r for r in rows.values()):  # NOTE: records before 2026-12-07 have none
        lines += ["", "The server's processes during each run (stalls: `serve.metrics.ProcessWatch`; CPU: "
                  "cores busy on average, API process / engine core):", "",
                  "| policy | event loop wakes > 50 ms late | full collections | their total ms | CPU cores API / engine |",
                  "|---|---|---|---|---|"]
        for policy, r in rows.items():
            st, cpu = r.get("api_stalls") or {}, r.get("cpu_share") or {}
            lines.append(f"| {policy} | {st.get('loop_stalls_over_50ms', 0):.0f} of {st.get('loop_wakes', 0):.0f} | "
                         f"{st.get('gc2_passes', 0):.0f} | {1e3 * st.get('gc2_s', 0):.0f} | "
                         f"{cpu.get('api', 0):.2f} / {cpu.get('engine', 0):.2f} |")
    return "\n".join(lines) + "\n"


def _start(warm_line: str | None) -> str:
    """How a server started, from its warm-start log line (None: from the idle profile)."""
    if not warm_line:
        return "cold, the idle profile's model and margins of 1"
    return "warm, " + warm_line.removeprefix("conserve: warm start ").split(" (--no-warm-start")[0]


def _pcts(values: dict | None) -> str:
    return "-" if not values else f"{values['p50']:.1%} / {values['p90']:.1%}"


def _x(value, interval: dict | None = None) -> str:
    """A ratio; with its bootstrap interval, the interval's own ratio (`bench`'s percentiles
    of the per-request times) and its bounds."""
    if interval is not None and interval["ratio"] is not None and interval["low"] is not None:
        return interval_text(interval)
    return "-" if value is None else f"{value:.2f}x"


def main() -> None:
    args = parse_args()
    from conserve_bench.bench.phases import ProfileCache

    out = Path(args.out or f"results/vllm-bench-serve-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty: give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    # the profile the servers load is the one whose figures the record gives
    host = host_profile(args.db, measure=not args.no_profile)
    profiles = ProfileCache(args.db, args.model)
    labels = labelled(args.policies)
    runs = {label: run_policy(args, policy, out, profiles, label) for label, policy in labels}
    rows, pools = with_ratios(runs), pooled(runs, dict(labels))
    report = {"config": vars(args), "policies": rows, "pooled": pools}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(rows, args, pools))
    write_measured("vllm_bench_serve", {"policies": rows, "pooled": pools}, args, host)
    print(markdown(rows, args, pools))
    for policy, row in rows.items():
        print(f"{policy}: {row['serve_targets']}")
    print(f"wrote {out}/report.json, report.md")


if __name__ == "__main__":  # NOTE: vLLM spawns processes that re-import this file
    main()
