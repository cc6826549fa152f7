"""Scores independent of the traffic beside them, side by side on one host.

The same two jobs (MMLU 5-shot on a long subject and a short one; a greedy generation task)
run by `submit` alone (the reference), then through `serve`, each run on a server of its own
(a store of its own, so nothing is reused):

- idle: no online traffic;
- loaded: bursts of online completions while the jobs run (offline and online requests share
  steps; offline-only steps are cut by arrivals);
- preempted: the same bursts on a KV cache of `--kv-blocks` blocks and a checkpoint pool of
  `--pool-gib`: offline requests are preempted for the online ones and resume from their KV
  checkpoints (the pool small enough to evict);

in each scoring mode (default, `--deterministic`), and the loaded run under `--policy
priority` and under `online-only` then drained (the jobs queued while the bursts run, run by a
conserve server once they stop). Per run: the largest per-request loglikelihood difference to
the reference (nats), `is_greedy` flips, greedy generations that differ, subject scores equal,
steps cut by arrivals, KV resumes (those that loaded from the pool), and the offline work's
wall time: the deterministic mode's throughput cost is its loaded run's time over the default's.
Writes benchmarks/measured/score_independence.json (`benchmarks.tables` renders
docs/measured.md#scores-independent-of-load).

    python -m benchmarks.score_independence          # about 12 minutes on 2 idle cores

`tests/test_score_independence.py` runs the preempted run of the default mode (the defaults
`serve` runs) against `submit`, and the arrival test, in the suite.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, add_measured_args, host_profile, write_measured

MMLU_TASKS = ("mmlu_high_school_european_history", "mmlu_abstract_algebra")  # ~3,200 and ~700 tokens
GEN_TASKS = ("conserve_tiny_gen",)
TEST_TASKS = REPO / "tests" / "tasks"  # the greedy generation task (no hub needed)
KEY = "score-independence"
LOGPROB_TOLERANCE = 1e-4  # nats: the issue's bound for "the same loglikelihood"


def job_bodies(mmlu_limit: int, gen_limit: int) -> list[dict[str, Any]]:
    """The two jobs, as the job API takes them (`POST /v1/jobs`)."""
    return [{"tasks": list(MMLU_TASKS), "limit": mmlu_limit, "num_fewshot": 5},
            {"tasks": list(GEN_TASKS), "limit": gen_limit}]


def run_alone(bodies: list[dict[str, Any]], engine, data_dir: str, db_url: str) -> list[dict[str, Any]]:
    """The jobs run by `submit`'s path on `engine` alone: [{"items", "metrics"}] per job."""
    from conserve_bench.config import JobSpec
    from conserve_bench.jobs.lifecycle import run_job, submit_job, task_metrics
    from conserve_bench.store import Store

    store, runs = Store(db_url), []
    for body in bodies:
        job = submit_job(store, JobSpec(tasks=tuple(body["tasks"]), limit=body["limit"],
                                        num_fewshot=body.get("num_fewshot"), data_dir=data_dir),
                         include_paths=(str(TEST_TASKS),))
        results = run_job(store, job.id, engine, output_dir=None, include_paths=(str(TEST_TASKS),))
        runs.append({"items": store.job_items(job.id), "metrics": task_metrics(results)})
    return runs


def served_results(http, store_url: str, job_ids: list[str]) -> list[dict[str, Any]]:
    """[{"items", "metrics"}] of finished jobs on a server (`http`: its authorised client)."""
    from conserve_bench.jobs.lifecycle import task_metrics
    from conserve_bench.store import Store

    store = Store(store_url)
    return [{"items": store.job_items(job_id),
             "metrics": task_metrics(http.get(f"/v1/jobs/{job_id}/results").json())}
            for job_id in job_ids]


def compare(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """How far `runs` are from `reference`, request by request (items in the order lm-eval
    made them) and score by score."""
    max_diff, flips, texts, num = 0.0, 0, 0, 0
    for run, ref in zip(runs, reference, strict=True):
        for ours, theirs in zip(run["items"], ref["items"], strict=True):
            a, b = ours["result"], theirs["result"]
            num += 1
            if isinstance(b, list):  # loglikelihood: [logprob, is_greedy]
                max_diff = max(max_diff, abs(a[0] - b[0]))
                flips += a[1] != b[1]
            elif isinstance(b, (int, float)):  # rolling loglikelihood
                max_diff = max(max_diff, abs(a - b))
            else:
                texts += a != b
    return {"num_requests": num, "max_logprob_diff": max_diff, "is_greedy_flips": flips,
            "texts_differ": texts,
            "scores_equal": all(r["metrics"] == f["metrics"] for r, f in zip(runs, reference))}


def same_results(comparison: dict[str, Any]) -> bool:
    return (comparison["max_logprob_diff"] <= LOGPROB_TOLERANCE and comparison["is_greedy_flips"] == 0
            and comparison["texts_differ"] == 0 and comparison["scores_equal"])


class OnlineBursts(threading.Thread):
    """Bursts of `size` concurrent online completions until `stop()` (or `max_bursts` of them):
    prompts of about `prompt_words` words, `max_tokens` generated; `sent` and `failed` counted.

    After each burst it waits `period_s`, or `idle_factor` times as long as the burst took when
    that is longer: the online share of the engine's time is then at most 1 / (1 + idle_factor)
    on any host (a fixed period that leaves a fast host half idle can saturate a slow one)."""

    def __init__(self, url: str, api_key: str, size: int = 6, period_s: float = 1.0,
                 prompt_words: int = 150, max_tokens: int = 16, seed: int = 0,
                 idle_factor: float = 0.0, max_bursts: int | None = None):
        super().__init__(daemon=True)
        self.url, self.api_key, self.size, self.period_s = url, api_key, size, period_s
        self.prompt_words, self.max_tokens = prompt_words, max_tokens
        self.idle_factor, self.max_bursts = idle_factor, max_bursts
        self._rng, self._halt = random.Random(seed), threading.Event()
        self.sent = self.failed = self.bursts = 0

    def run(self) -> None:
        import httpx

        words = "the of and to in is that for it as with was on be by this are from at or".split()
        with httpx.Client(base_url=self.url, timeout=120,
                          headers={"Authorization": f"Bearer {self.api_key}"}) as http, \
                ThreadPoolExecutor(self.size) as pool:
            while not self._halt.is_set() and self.bursts != self.max_bursts:
                prompts = [" ".join(self._rng.choice(words) for _ in range(self.prompt_words))
                           for _ in range(self.size)]
                started = time.monotonic()
                answers = list(pool.map(lambda p: self._complete(http, p), prompts))
                self.bursts += 1
                self.sent += len(answers)
                self.failed += answers.count(False)
                self._halt.wait(max(self.period_s, self.idle_factor * (time.monotonic() - started)))

    def _complete(self, http, prompt: str) -> bool:
        try:
            answer = http.post("/v1/completions", json={
                "model": "smollm2-135m", "prompt": prompt, "max_tokens": self.max_tokens,
                "temperature": 0})
            return answer.status_code == 200
        except Exception:  # noqa: BLE001 - counted: a failed request is part of the result
            return False

    def stop(self) -> None:
        self._halt.set()
        self.join(300)


def step_log_counts(path: Path) -> dict[str, int]:
    """From a step log: steps cut by an arrival (and by the fault hook), steps an arrival let
    run out (`policy.run_out_share`), preempted requests resumed, those that loaded KV from the
    checkpoint pool, and the tokens they loaded."""
    from conserve_bench.sched.steplog import read_step_log_with_notes

    cuts = forced = run_outs = resumes = loaded_resumes = loaded_tokens = 0
    for _, notes in read_step_log_with_notes(path):
        if notes.get("aborted"):
            cuts += notes.get("arrival_ns") is not None
            forced += notes.get("arrival_ns") is None
        run_outs += notes.get("run_out_layer") is not None
        for _, num_loaded, _, _ in notes.get("kv_resumes", ()):
            resumes += 1
            loaded_resumes += num_loaded > 0
            loaded_tokens += num_loaded
    return {"arrival_cuts": cuts, "forced_cuts": forced, "arrival_run_outs": run_outs, "kv_resumes": resumes,
            "kv_resumes_loaded": loaded_resumes, "kv_loaded_tokens": loaded_tokens}


def serve_args(db_url: str, data_dir: str, folder: Path, *, policy: str = "conserve",
               deterministic: bool = False, kv_blocks: int | None = None,
               pool_gib: float | None = None) -> list[str]:
    """`serve` flags for one run: its own store, step log and output under `folder`."""
    args = ["--db", db_url, "--data-dir", data_dir, "--output", str(folder / "results"),
            "--api-key", KEY, "--include-path", str(TEST_TASKS), "--policy", policy,
            "--step-log", str(folder / "steps.jsonl"), "--max-offline-inflight", "8"]
    if deterministic:
        args.append("--deterministic")
    if kv_blocks:
        args += ["--num-gpu-blocks-override", str(kv_blocks)]
    if pool_gib is not None and policy == "conserve":
        args += ["--kv-checkpoint-gib", str(pool_gib)]
    return args


def served_run(folder: Path, data_dir: str, bodies, load: dict[str, Any] | None, profile_db: str,
               **serve_kwargs) -> dict:
    """The jobs on a server of their own (`serve_kwargs`: `serve_args`'), under bursts
    (`load`: `OnlineBursts` settings; None: idle), the host's profile copied from
    `profile_db`: results, timings and step-log counts."""
    import httpx

    from conserve_bench.serve.process import ServerProcess

    folder.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{folder / 'store.db'}"
    copy_profile(profile_db, db_url)
    with ServerProcess(serve_args(db_url, data_dir, folder, **serve_kwargs), folder) as server:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        bursts = OnlineBursts(server.url, KEY, **load) if load is not None else None
        started = time.monotonic()
        job_ids = [http.post("/v1/jobs", json=body).json()["id"] for body in bodies]
        if bursts is not None:
            bursts.start()
        try:
            wait_done(http, job_ids)
        finally:
            if bursts is not None:
                bursts.stop()
        wall_s = time.monotonic() - started
        runs = served_results(http, db_url, job_ids)
    return {"runs": runs, "wall_s": wall_s, **step_log_counts(folder / "steps.jsonl"),
            "online_sent": bursts.sent if bursts else 0, "online_failed": bursts.failed if bursts else 0}


def wait_done(http, job_ids: list[str], timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [http.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        if bad := [j for j in jobs if j["state"] in ("failed", "cancelled")]:
            raise RuntimeError(f"job ended {bad[0]['state']}: {bad[0]}")
        if all(j["state"] == "done" for j in jobs):
            return
        time.sleep(0.5)
    raise TimeoutError(f"jobs {job_ids} not done in {timeout_s:.0f} s")


def copy_profile(source_url: str, db_url: str) -> None:
    """This host's stored latency profile, into a run's fresh store (each run profiles nothing)."""
    from conserve_bench.profiling.profiles import current_key, require_profile, save_profile
    from conserve_bench.store import Store

    profile = require_profile(Store(source_url), current_key("smollm2-135m", "float32"))
    save_profile(Store(db_url), profile)


def drained_run(folder: Path, data_dir: str, bodies, load: dict[str, Any], profile_db: str) -> dict:
    """`online-only` under the bursts with the jobs queued, then a conserve server drains
    them on the same store once the bursts stop."""
    import httpx

    from conserve_bench.serve.process import ServerProcess

    folder.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{folder / 'store.db'}"
    copy_profile(profile_db, db_url)
    with ServerProcess(serve_args(db_url, data_dir, folder, policy="online-only"), folder) as server:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        job_ids = [http.post("/v1/jobs", json=body).json()["id"] for body in bodies]
        bursts = OnlineBursts(server.url, KEY, **load)
        bursts.start()
        time.sleep(20)
        bursts.stop()
        assert all(http.get(f"/v1/jobs/{j}").json()["done"] == 0 for j in job_ids)
    drain = folder / "drain"
    drain.mkdir()
    with ServerProcess(serve_args(db_url, data_dir, drain), drain) as server:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        started = time.monotonic()
        wait_done(http, job_ids)
        return {"runs": served_results(http, db_url, job_ids), "wall_s": time.monotonic() - started,
                **step_log_counts(drain / "steps.jsonl"), "online_sent": bursts.sent,
                "online_failed": bursts.failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mmlu"))
    parser.add_argument("--mmlu-limit", type=int, default=6)
    parser.add_argument("--gen-limit", type=int, default=10)
    parser.add_argument("--kv-blocks", type=int, default=32, help="KV blocks of the preempted runs")
    parser.add_argument("--pool-gib", type=float, default=0.1, help="KV checkpoint pool of the preempted runs")
    parser.add_argument("--burst-size", type=int, default=6)
    parser.add_argument("--burst-every-s", type=float, default=2.5)
    parser.add_argument("--burst-idle-factor", type=float, default=0.0,
                        help="wait at least this many times a burst's own time after it (2: online "
                             "work a third of the time on any host) [default: the fixed period]")
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--profile-db", default=None,
                        help="A store holding this host's profile [default: `profile --quick` first]")
    add_measured_args(parser, "score_independence")
    args = parser.parse_args()
    if args.no_profile and not args.profile_db:
        parser.error("the servers load this host's profile: --no-profile needs --profile-db")
    bodies = job_bodies(args.mmlu_limit, args.gen_limit)
    load = {"size": args.burst_size, "period_s": args.burst_every_s,
            "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
            "idle_factor": args.burst_idle_factor}
    with tempfile.TemporaryDirectory(prefix="score-independence-") as tmp:
        work = Path(tmp)
        profile_db = args.profile_db or f"sqlite:///{work / 'profile.db'}"
        # NOTE: the host's figures and the profile every run's server loads: one measurement
        host = host_profile(profile_db, measure=not args.profile_db)
        reference = alone_reference(bodies, args.data_dir, work)
        rows: dict[str, dict[str, Any]] = {}
        for mode, deterministic in (("default", False), ("deterministic", True)):
            for name, run_load, preempt in (("idle", None, False), ("loaded", load, False),
                                            ("preempted", load, True)):
                kwargs = {"deterministic": deterministic}
                if preempt:
                    kwargs |= {"kv_blocks": args.kv_blocks, "pool_gib": args.pool_gib}
                rows[f"{mode}/{name}"] = served_run(work / f"{mode}-{name}", args.data_dir, bodies,
                                                    run_load, profile_db, **kwargs)
                print(f"{mode}/{name}: {summary(rows[f'{mode}/{name}'], reference)}", flush=True)
        rows["priority/loaded"] = served_run(work / "priority", args.data_dir, bodies, load, profile_db,
                                             policy="priority")
        rows["online-only-drained"] = drained_run(work / "drained", args.data_dir, bodies, load, profile_db)
        for name in ("priority/loaded", "online-only-drained"):
            print(f"{name}: {summary(rows[name], reference)}", flush=True)
    result = {"num_requests": sum(len(r["items"]) for r in reference),
              "runs": {name: {**{k: v for k, v in row.items() if k != "runs"},
                              **compare(row["runs"], reference)} for name, row in rows.items()},
              "scores": reference_scores(reference)}
    result["deterministic_throughput_cost"] = (result["runs"]["deterministic/loaded"]["wall_s"]
                                               / result["runs"]["default/loaded"]["wall_s"])
    write_measured("score_independence", result, args, host)


def alone_reference(bodies, data_dir: str, work: Path) -> list[dict[str, Any]]:
    """The reference: `submit`'s path on an in-process engine, nothing else running."""
    from conserve_bench.engine.local import start_engine
    from conserve_bench.engine.models import resolve_model

    with start_engine(resolve_model("smollm2-135m")) as engine:
        return run_alone(bodies, engine, data_dir, f"sqlite:///{work / 'alone.db'}")


def reference_scores(reference) -> dict[str, Any]:
    return {task: metrics for run in reference for task, metrics in run["metrics"].items()}


def summary(row: dict[str, Any], reference) -> str:
    c = compare(row["runs"], reference)
    return (f"max diff {c['max_logprob_diff']:.2e} nats, {c['is_greedy_flips']} is_greedy flips, "
            f"{c['texts_differ']} texts differ, scores equal {c['scores_equal']}; "
            f"{row['arrival_cuts']} cuts, {row['arrival_run_outs']} run out, {row['kv_resumes_loaded']}/{row['kv_resumes']} resumes loaded; "
            f"{row['wall_s']:.1f} s, {row['online_sent']} online")


if __name__ == "__main__":
    main()
