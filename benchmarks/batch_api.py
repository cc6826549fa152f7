"""The OpenAI Batch API on `serve`, side by side on one host, through the official `openai` client.

One batch of `--lines` chat completions (MMLU test questions as prompts, read from
`--data-dir`; a mix of short and long generations, greedy), run five ways, each on a fresh
server of its own store (this host's profile copied in):

- alone: `serve` (its defaults: conserve, layer preemption, KV checkpoints) and the batch, no
  online traffic: the harvest rate with nothing to harvest around;
- vllm run-batch: vLLM's own offline batch runner on the same file and engine settings (its
  processing time: wall time less that of a one-line file, the start-up);
- online-only: the conv trace's arrivals (scaled as `bench` scales them) alone;
- co-served: the same trace beside the batch on `serve`'s defaults: online P99 TTFT/TBT/TPOT
  over online-only's with 95% bootstrap intervals (`bench.summary.tail_intervals`);
- killed: the batch, the server SIGKILLed (engine processes with it) once `--kill-at` of it
  is done, restarted on the same store: lines computed twice, generations continued;
- online-only again, with `--aa`, after the co-served run: its ratios to the first are this
  host's own noise (an A/A run), and the co-served run is also compared with both pooled.

`--phases` runs a part (the alone run always: the reference and the window's length), e.g.
`--phases online-only,co-served --aa --rate 1.5` for the online tails alone.

Every output file is compared line by line (text, finish reason, token counts) with the alone
run's, run-batch's too, and `--alone-sample` lines are sent alone, one at a time, to an idle
server. Writes benchmarks/measured/batch_api.json (`benchmarks.tables` renders
docs/measured.md#the-openai-batch-api).

    python -m benchmarks.batch_api                 # about 30 minutes on 2 idle cores
    python -m benchmarks.batch_api --phases online-only,co-served --aa --rate 1.5   # tails, ~25 min
    python -m benchmarks.batch_api --lines 40 --window-s 20 --alone-sample 4 \\
        --no-profile --profile-db sqlite:///conserve.db --measured /tmp/batch.json   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, add_measured_args, host_profile, write_measured
from benchmarks.score_independence import copy_profile

KEY = "batch-api"
MODEL = "smollm2-135m"
PHASES = ("run-batch", "online-only", "co-served", "killed")


def batch_lines(num_lines: int, data_dir: str, long_share: float, short_tokens: int, long_tokens: int,
                seed: int) -> list[dict[str, Any]]:
    """The batch: one chat request per MMLU test question (subjects in turn), `long_share`
    of them allowed `long_tokens`, the rest `short_tokens`."""
    rng = random.Random(seed)
    questions = []
    for path in sorted(Path(data_dir, "test").glob("*_test.csv")):
        with path.open(newline="") as f:
            questions += [row for row in csv.reader(f)][:max(1, num_lines // 50 + 1)]
    rng.shuffle(questions)
    lines = []
    for i, (question, a, b, c, d, _) in enumerate(questions[:num_lines]):
        long = rng.random() < long_share
        prompt = f"{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n" + (
            "Explain which answer is right, step by step." if long else "Answer with the letter only.")
        lines.append({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": long_tokens if long else short_tokens, "temperature": 0}})
    return lines


def serve_args(db_url: str, folder: Path, policy: str = "conserve") -> list[str]:
    return ["--db", db_url, "--api-key", KEY, "--policy", policy, "--output", str(folder),
            "--step-log", str(folder / "steps.jsonl")]


def server(folder: Path, profile_db: str, policy: str = "conserve"):
    from conserve_bench.serve.process import ServerProcess

    folder.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{folder / 'store.db'}"
    copy_profile(profile_db, db_url)
    return ServerProcess(serve_args(db_url, folder, policy), folder), db_url


def client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=5, timeout=600)


def submit(oai, input_path: Path):
    uploaded = oai.files.create(file=input_path.open("rb"), purpose="batch")
    return oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h")


def wait_batch(oai, batch_id: str, until=lambda b: b.status == "completed", poll_s: float = 1.0):
    while True:
        found = oai.batches.retrieve(batch_id)
        if found.status in ("failed", "expired", "cancelled"):
            raise RuntimeError(f"batch {batch_id} {found.status}")
        if until(found):
            return found
        time.sleep(poll_s)


def output_lines(oai, batch) -> dict[str, dict[str, Any]]:
    text = oai.files.content(batch.output_file_id).text
    return {line["custom_id"]: line for line in map(json.loads, text.splitlines())}


def answer(line: dict[str, Any]) -> tuple:
    """What must be equal between two runs of a request: the text, why it ended, the tokens."""
    body = line["response"]["body"]
    choice = body["choices"][0]
    return (choice["message"]["content"], choice["finish_reason"], body["usage"]["prompt_tokens"],
            body["usage"]["completion_tokens"])


def differences(lines: dict[str, dict], reference: dict[str, dict]) -> list[str]:
    return sorted(c for c in reference if c not in lines or answer(lines[c]) != answer(reference[c]))


def without_created(line: dict[str, Any]) -> dict[str, Any]:
    return {**line, "response": {**line["response"], "body": {**line["response"]["body"], "created": None}}}


def field_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (dotted paths)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in field_differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in field_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def usage_totals(lines: dict[str, dict]) -> dict[str, int]:
    usage = [line["response"]["body"]["usage"] for line in lines.values()]
    return {"prompt_tokens": sum(u["prompt_tokens"] for u in usage),
            "completion_tokens": sum(u["completion_tokens"] for u in usage)}


def run_alone(work: Path, profile_db: str, input_path: Path) -> dict[str, Any]:
    proc, _ = server(work / "alone", profile_db)
    with proc:
        oai = client(proc.url)
        t0 = time.perf_counter()
        batch = wait_batch(oai, submit(oai, input_path).id)
        wall_s = time.perf_counter() - t0
        lines = output_lines(oai, batch)
        (work / "alone.jsonl").write_text(oai.files.content(batch.output_file_id).text)
    return {"wall_s": wall_s, "lines": lines, **usage_totals(lines)}


def run_vllm_batch(work: Path, lines: list[dict], input_path: Path) -> dict[str, Any]:
    """vLLM's `run_batch` on the file, and on its first line alone (the start-up to subtract),
    with the engine arguments and environment `serve` gives vLLM (`engine.local`'s)."""
    from conserve_bench.config import ModelOptions
    from conserve_bench.engine.local import engine_args, engine_config, engine_environment
    from conserve_bench.engine.models import resolve_model

    cfg = engine_config(resolve_model(MODEL), ModelOptions())
    engine_environment(cfg)  # NOTE: into this process's environment, which run-batch inherits
    flags = ["--served-model-name", MODEL]
    for name, value in engine_args(cfg).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    one = work / "one.jsonl"
    one.write_text(json.dumps(lines[0]) + "\n")
    walls = {}
    for name, path in (("one", one), ("all", input_path)):
        out = work / f"run-batch-{name}.jsonl"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(path),
                        "-o", str(out), *flags], check=True, stdout=subprocess.DEVNULL,
                       stderr=(work / f"run-batch-{name}.log").open("w"))
        walls[name] = time.perf_counter() - t0
    found = {line["custom_id"]: line for line in map(json.loads, (work / "run-batch-all.jsonl").read_text().splitlines())}
    answered = {c: line for c, line in found.items() if (line.get("response") or {}).get("body")}
    return {"wall_s": walls["all"], "startup_s": walls["one"], "processing_s": walls["all"] - walls["one"],
            "lines": answered, **usage_totals(answered)}


def online_requests(trace: str, window_s: float, rate: float, seed: int):
    """The conv trace's requests over `window_s`, at `rate`, tokens scaled as `bench` scales them."""
    from conserve_bench.bench.setting import BenchSetting
    from conserve_bench.bench.workload import read_azure_trace, rescale_to_rate, scale_tokens

    setting = BenchSetting  # NOTE: its defaults: the token scale and caps `bench` replays with
    requests = rescale_to_rate(read_azure_trace(trace), rate)
    requests = [r for r in requests if r.arrival_s < window_s]
    return scale_tokens(requests, setting.token_scale, setting.max_context_tokens, setting.max_generated_tokens)


def replay(url: str, requests) -> list:
    from conserve_bench.bench.loadgen import OnlineClient

    async def run():
        online = OnlineClient(url, MODEL, seed=0, api_key=KEY)
        try:
            return await online.replay(requests, drain_timeout_s=120)
        finally:
            await online.close()

    return asyncio.run(run())


def run_online_only(work: Path, profile_db: str, requests, sample: list[dict]) -> dict[str, Any]:
    import httpx

    proc, _ = server(work / "online-only", profile_db, policy="online-only")
    with proc:
        records = replay(proc.url, requests)
        # NOTE: then each sampled request alone, one at a time, on the idle server
        http = httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
        alone = {line["custom_id"]: {"response": {"body": http.post("/v1/chat/completions", json=line["body"]).json()}}
                 for line in sample}
    return {"records": records, "alone": alone}


def run_co_served(work: Path, profile_db: str, input_path: Path, requests) -> dict[str, Any]:
    proc, _ = server(work / "co-served", profile_db)
    with proc:
        oai = client(proc.url)
        t0 = time.perf_counter()
        batch_id = submit(oai, input_path).id
        records = replay(proc.url, requests)
        batch = wait_batch(oai, batch_id)
        wall_s = time.perf_counter() - t0
        lines = output_lines(oai, batch)
    return {"records": records, "wall_s": wall_s, "lines": lines}


def run_killed(work: Path, profile_db: str, input_path: Path, kill_at: float) -> dict[str, Any]:
    from conserve_bench.store import Store

    proc, db_url = server(work / "killed", profile_db)
    with proc:
        oai = client(proc.url)
        batch = submit(oai, input_path)
        at_kill = wait_batch(oai, batch.id, lambda b: b.request_counts.completed >= kill_at * b.request_counts.total,
                             poll_s=0.2)
        proc.signal(signal.SIGKILL)
    store = Store(db_url)
    job_id = at_kill.conserve["job_id"]
    done_before = sum(1 for item in store.job_items(job_id) if item["state"] == "done")
    from conserve_bench.serve.process import ServerProcess

    restart = work / "killed" / "restart"  # NOTE: on the killed run's store
    restart.mkdir()
    with ServerProcess(serve_args(db_url, restart), restart) as proc:
        oai = client(proc.url)
        final = wait_batch(oai, batch.id)
        lines = output_lines(oai, final)
        text = oai.files.content(final.output_file_id).text
    runs = store.run_counts(job_id)
    resumes = store.resumes(job_id)
    return {"lines": lines, "text": text, "done_before_kill": done_before,
            "lines_computed_twice": sum(1 for n in runs.values() if n > 1),
            "max_runs": max(runs.values()), "resumes": resumes}


def tails(records, base) -> dict[str, Any]:
    from conserve_bench.bench.summary import summarize_online, tail_intervals

    slo = 1e9  # attainment is not the point here: the ratios are
    return {"online": summarize_online(records, slo, slo), "ratios": tail_intervals(records, base)}


def phases_arg(value: str) -> tuple[str, ...]:
    phases = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"unknown phase {', '.join(unknown) or '(none)'}: "
                                         f"choose from {', '.join(PHASES)}")
    return phases


def online_phases(work: Path, profile_db: str, input_path: Path, lines: list[dict], reference: dict,
                  args, alone_wall_s: float) -> dict[str, Any]:
    """online-only (the sampled lines sent alone after it), co-served, and with `--aa` online-only
    again: the online tails, their ratios, and the outputs against the alone run's."""
    window_s = args.window_s or min(300.0, 0.9 * alone_wall_s)
    requests = online_requests(args.trace, window_s, args.rate, args.seed)
    sample = random.Random(args.seed).sample(lines, min(args.alone_sample, len(lines)))
    online_only = run_online_only(work, profile_db, requests, sample)
    result: dict[str, Any] = {
        "window_s": window_s, "online_requests": len(requests),
        "online_only": tails(online_only["records"], online_only["records"])["online"],
        "alone_requests": {"num": len(sample), "differ_from_batch": differences(online_only["alone"], {
            c: reference[c] for c in online_only["alone"]})}}
    co_served = None
    if "co-served" in args.phases:
        co_served = run_co_served(work, profile_db, input_path, requests)
        print(f"co-served: batch in {co_served['wall_s']:.1f} s", flush=True)
        result["co_served"] = {"wall_s": co_served["wall_s"],
                               "differs_from_alone": len(differences(co_served["lines"], reference)),
                               **tails(co_served["records"], online_only["records"])}
    if args.aa:
        from conserve_bench.bench.summary import tail_intervals

        again = run_online_only(work / "again", profile_db, requests, [])
        result["online_only_again"] = tails(again["records"], online_only["records"])
        if co_served is not None:
            result["co_served"]["ratios_to_both"] = tail_intervals(
                co_served["records"], online_only["records"] + again["records"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mmlu"))
    parser.add_argument("--trace", default=str(REPO.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"))
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--long-share", type=float, default=0.3)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=192)
    parser.add_argument("--rate", type=float, default=0.5, help="Online requests/s of the trace.")
    parser.add_argument("--window-s", type=float, default=None,
                        help="Online window [default: 90%% of the alone run's time, at most 300 s].")
    parser.add_argument("--kill-at", type=float, default=0.4, help="Share of the batch done at the SIGKILL.")
    parser.add_argument("--alone-sample", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", type=phases_arg, default=PHASES,
                        help=f"Which to run besides the alone run [{','.join(PHASES)}].")
    parser.add_argument("--aa", action="store_true", help="Online-only again after the co-served run (A/A).")
    parser.add_argument("--work", default=None,
                        help="Keep each server's folder here (step logs, server logs) [default: a temporary one]")
    parser.add_argument("--profile-db", default=None,
                        help="A store holding this host's profile [default: `profile --quick` first]")
    add_measured_args(parser, "batch_api")
    args = parser.parse_args()
    if args.no_profile and not args.profile_db:
        parser.error("the servers load this host's profile: --no-profile needs --profile-db")
    if "co-served" in args.phases and "online-only" not in args.phases:
        parser.error("the co-served run's ratios are to online-only's: --phases needs online-only too")
    lines = batch_lines(args.lines, args.data_dir, args.long_share, args.short_tokens, args.long_tokens, args.seed)
    if not lines:
        parser.error(f"no MMLU test questions (test/*_test.csv) in {args.data_dir}: give --data-dir")
    phases = args.phases
    with nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="batch-api-") as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        input_path = work / "batch.jsonl"
        input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        profile_db = args.profile_db or f"sqlite:///{work / 'profile.db'}"
        host = host_profile(profile_db, measure=not args.profile_db)
        alone = run_alone(work, profile_db, input_path)
        print(f"alone: {len(alone['lines'])} lines in {alone['wall_s']:.1f} s", flush=True)
        reference = alone["lines"]
        result: dict[str, Any] = {
            "num_lines": len(lines), "phases": list(phases),
            "alone": {"wall_s": alone["wall_s"], "lines_per_s": len(lines) / alone["wall_s"],
                      "completion_tokens": alone["completion_tokens"], "prompt_tokens": alone["prompt_tokens"],
                      "completion_tokens_per_s": alone["completion_tokens"] / alone["wall_s"]}}
        if "run-batch" in phases:
            vllm_batch = run_vllm_batch(work, lines, input_path)
            print(f"run-batch: {vllm_batch['processing_s']:.1f} s (+{vllm_batch['startup_s']:.1f} s start-up)", flush=True)
            result["vllm_run_batch"] = {k: vllm_batch[k] for k in ("wall_s", "startup_s", "processing_s",
                                                                   "completion_tokens")} | {
                "lines_per_s": len(lines) / vllm_batch["processing_s"],
                "differs_from_alone": len(differences(vllm_batch["lines"], reference))}
            result["harvest_vs_run_batch"] = vllm_batch["processing_s"] / alone["wall_s"]
        if "online-only" in phases:
            result |= online_phases(work, profile_db, input_path, lines, reference, args, alone["wall_s"])
        if "killed" in phases:
            killed = run_killed(work, profile_db, input_path, args.kill_at)
            alone_text = [without_created(json.loads(x)) for x in (work / "alone.jsonl").read_text().splitlines()]
            killed_text = [without_created(json.loads(x)) for x in killed["text"].splitlines()]
            result["killed"] = {k: killed[k] for k in ("done_before_kill", "lines_computed_twice", "max_runs",
                                                       "resumes")} | {
                "differs_from_alone": len(differences(killed["lines"], reference)),
                # NOTE: the alone run is another batch (ids of its own) on another server (vLLM's
                # system_fingerprint hashes its config, temporary paths included)
                "file_identical_but_created": killed_text == alone_text,
                "fields_that_differ": sorted({d for x, y in zip(killed_text, alone_text)
                                              for d in field_differences(x, y)})}
    print(json.dumps({k: v for k, v in result.items() if k != "online_only"}, indent=1, default=str))
    write_measured("batch_api", result, args, host)


if __name__ == "__main__":
    main()
