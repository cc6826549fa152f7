"""The `conserve-bench` command line: each command parses, calls one function, prints.

Errors the user can fix are `ConserveError`s, printed by `main` as one line on stderr with a
non-zero exit; no traceback. `--json` prints one machine-readable JSON object. What reaches
the terminal goes through `output.out`; a job's library output goes to its log.

    conserve-bench submit mmlu_anatomy --limit 20 --data-dir ../shared/data/mmlu
    conserve-bench status 3f2a9c1d0b7e --json
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from conserve_bench.jobs import lifecycle
from conserve_bench.config import (DEFAULT_CHECKPOINT_S, DEFAULT_CHECKPOINT_TOKENS, DEFAULT_MODEL,
                                   JobSpec, LeaseConfig, RunConfig, default_data_dir,
                                   default_db_url)
from conserve_bench.serve.client import JobClient
from conserve_bench.errors import ConserveError, JobStateError
from conserve_bench.engine.models import resolve_model
from conserve_bench.output import Phases, out
from conserve_bench.sched.policy import SAFEPOINT_EVERY
from conserve_bench.store import JobState, Store

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run LLM evaluation suites on the idle cycles of a serving GPU.")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="Job store URL [env CONSERVE_BENCH_DB; default sqlite:///conserve.db]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
JobArg = Annotated[str, typer.Argument(help="Job id.")]
OutputOpt = Annotated[str, typer.Option("--output", help="Directory for results/<job-id>.json.")]
InflightOpt = Annotated[int, typer.Option("--max-inflight", min=1, help="Work items in flight at once.")]
KVCheckpointOpt = Annotated[float, typer.Option("--kv-checkpoint-gib", min=0, help="Host memory for KV checkpoints, so a request vLLM preempts (its KV cache full) resumes by loading its KV instead of recomputing it; 0 turns them off [default: 0 in-process, where no online work preempts; serve's default is a quarter of the free RAM].")]
ServerOpt = Annotated[Optional[str], typer.Option("--server", help="URL of a running `conserve-bench serve`.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show vLLM's and lm-eval's own output on the terminal instead of in results/<job-id>.log.")]
CheckpointTokensOpt = Annotated[int, typer.Option("--checkpoint-tokens", min=0, help="Checkpoint each generation in flight every N new tokens, so an interrupted one continues; 0: off (it starts over).")]
CheckpointSOpt = Annotated[float, typer.Option("--checkpoint-s", min=0.001, help="...or every S seconds, whichever comes first.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="CONSERVE_BENCH_API_KEY", help="Bearer key of the server.")]


def _store(db: str | None) -> Store:
    return Store(db or default_db_url())


@app.command()
def submit(
    tasks: Annotated[str, typer.Argument(help="Comma-separated lm-eval tasks or groups, e.g. mmlu.")],
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    limit: Annotated[Optional[int], typer.Option(help="At most N documents per task.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local MMLU CSV folder [env CONSERVE_BENCH_DATA].")] = None,
    db: DbOpt = None,
    output: OutputOpt = "results",
    max_inflight: InflightOpt = 64,
    checkpoint_tokens: CheckpointTokensOpt = DEFAULT_CHECKPOINT_TOKENS,
    checkpoint_s: CheckpointSOpt = DEFAULT_CHECKPOINT_S,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="Follow the job to the end, or only record it (for the `serve` replicas on --db or --server to run) [default: --wait, --no-wait with --server].")] = None,
    kv_checkpoint_gib: KVCheckpointOpt = 0.0,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
):
    """Create a job and run it in-process, or queue it for servers. Example: submit mmlu --limit 5"""
    spec = _spec(tasks, model, limit, num_fewshot, data_dir or default_data_dir())
    if server:
        _submit_remote(JobClient(server, api_key), spec, bool(wait), as_json)
        return
    store = _store(db)
    job = lifecycle.submit_job(store, spec)
    if wait is False:
        out.json(job.to_dict()) if as_json else out.stdout.print(
            f"job [bold]{job.id}[/] queued: {', '.join(spec.tasks)} on {spec.model}")
        return
    if not as_json:
        out.stdout.print(f"job [bold]{job.id}[/] submitted: {', '.join(spec.tasks)} on {spec.model}")
    _run(store, job.id, output, _run_config(max_inflight, checkpoint_tokens, checkpoint_s), as_json,
         verbose, kv_checkpoint_gib)


@app.command()
def resume(job_id: JobArg, db: DbOpt = None, output: OutputOpt = "results",
           max_inflight: InflightOpt = 64, kv_checkpoint_gib: KVCheckpointOpt = 0.0,
           checkpoint_tokens: CheckpointTokensOpt = DEFAULT_CHECKPOINT_TOKENS,
           checkpoint_s: CheckpointSOpt = DEFAULT_CHECKPOINT_S,
           as_json: JsonOpt = False, verbose: VerboseOpt = False):
    """Continue a job where it stopped: finished items are reused, interrupted generations
    continue from their checkpoints. Example: resume 3f2a9c1d0b7e"""
    store = _store(db)
    job = store.get_job(job_id)
    if job.state == JobState.DONE:
        _print_results(lifecycle.job_results(store, job_id), as_json)
        return
    _run(store, job_id, output, _run_config(max_inflight, checkpoint_tokens, checkpoint_s), as_json,
         verbose, kv_checkpoint_gib)


@app.command("jobs")
def list_jobs(db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
              as_json: JsonOpt = False):
    """List jobs, newest first, and the live replicas (workers) of the store."""
    found = JobClient(server, api_key).jobs() if server else lifecycle.fleet_overview(_store(db))
    if as_json:
        out.json(found)
        return
    table = Table("id", "state", "done/total", "failed", "tasks", "model")
    for j in found["jobs"]:
        table.add_row(j["id"], j["state"], f"{j['done']}/{j['total']}", str(j["failed"] or ""),
                      ",".join(j["tasks"]), j["model"])
    out.stdout.print(table)
    if found["replicas"]:
        live = Table("live replica", "label", "job", "heartbeat", title="live replicas")
        for r in found["replicas"]:
            live.add_row(r["id"], r["label"], r["job"] or "-", f"{r['heartbeat_age_s']:.0f}s ago")
        out.stdout.print(live)


@app.command()
def status(job_id: JobArg, db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
           as_json: JsonOpt = False):
    """Show one job's state, progress per replica, and items that failed every attempt."""
    job = JobClient(server, api_key).status(job_id) if server else lifecycle.job_status(_store(db), job_id)
    if as_json:
        out.json(job)
        return
    failed = f", {job['failed']} failed" if job["failed"] else ""
    partial = (f" ({job['partial_items']} partly generated, {job['partial_tokens']:,} tokens)"
               if job.get("partial_items") else "")
    out.stdout.print(f"{job['id']}: {job['state']}, {job['done']}/{job['total']} items{partial}{failed}, "
                     f"tasks {','.join(job['tasks'])}" + (f" ({job['error']})" if job["error"] else ""),
                     highlight=False)
    for r in job["replicas"]:
        out.stdout.print(f"  {r['id']} ({r['label'] or 'unknown'}, {'live' if r['live'] else 'gone'}): "
                         f"{r['done']} done, {r['running']} in flight", highlight=False)
    for e in job["item_errors"]:
        out.stdout.print(f"  failed {e['kind']} {e['key'][:12]} after {e['attempts']} attempts: {e['error']}",
                         highlight=False)


@app.command()
def results(job_id: JobArg, db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
            as_json: JsonOpt = False):
    """Print a finished job's scores."""
    if server:
        _print_summary(JobClient(server, api_key).results(job_id), as_json)
    else:
        _print_results(lifecycle.job_results(_store(db), job_id), as_json)


@app.command()
def cancel(job_id: JobArg, db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
           as_json: JsonOpt = False):
    """Cancel a job; its finished items stay stored and reusable."""
    job = JobClient(server, api_key).cancel(job_id) if server else lifecycle.cancel_job(_store(db), job_id).to_dict()
    if as_json:
        out.json(job)
    else:
        out.stdout.print(f"{job['id']}: cancelled at {job['done']}/{job['total']} items")


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller sweep (about 60 s of profiling on an idle 2-core CPU).")] = False,
    show: Annotated[bool, typer.Option("--show", help="Print the stored profile for this machine; measure nothing.")] = False,
    db: DbOpt = None,
):
    """Measure the engine's step latency and fit the latency model. Example: profile --quick"""
    from conserve_bench.sched import profiler

    store = _store(db)
    refit = None
    if show:
        found, refit = profiler.show_profile(store, model)
    else:
        with out.progress() as progress:
            task = progress.add_task("starting engine", total=None)
            result = profiler.run_profile(
                store, model, quick,
                on_started=lambda: progress.update(task, description="profiling"),
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        found = result.profile
        out.stderr.print(f"swept {len(result.sweep.samples)} steps in {result.sweep.wall_s:.0f}s")
    columns = ("quantity", "profile") + (("live refit",) if refit else ())
    table = Table(*columns, title="step latency model (held-out: shapes not fitted on)")
    for row in profiler.summary_rows(found, refit):
        table.add_row(*row[:len(columns)])
    out.stdout.print(table)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Bind address; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    db: DbOpt = None,
    policy: Annotated[str, typer.Option(help="conserve | priority | online-only")] = "conserve",
    api_key: ApiKeyOpt = None,
    ttft_slo_ms: Annotated[Optional[float], typer.Option("--ttft-slo-ms", help="Online TTFT target; given (or --tbt-slo-ms), conserve spends it on offline work [default: counted only, 2x a 1024-token prefill, from the profile].")] = None,
    tbt_slo_ms: Annotated[Optional[float], typer.Option("--tbt-slo-ms", help="Online TBT target; given, conserve fills steps up to it [default: counted only, 5x a decode step, from the profile].")] = None,
    slo_margin: Annotated[float, typer.Option("--slo-margin", help="conserve with SLOs: offline work fills steps up to (1 - margin) x the TBT target.")] = 0.1,
    quantum_ms: Annotated[Optional[float], typer.Option("--quantum-ms", help="conserve with --layer-preemption off: longest offline-only step [default: the slowdown share of the 90th-percentile online prompt's prefill; with SLOs, 25% of the TTFT target].")] = None,
    max_slowdown: Annotated[Optional[float], typer.Option("--max-slowdown", help="conserve without SLOs: the share offline work may add to online steps [default: derived from 1.25x and the profile's error, about 0.2].")] = None,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="conserve: plan with the latency model refitted from live steps while it predicts them better.")] = True,
    layer_preemption: Annotated[Optional[str], typer.Option("--layer-preemption", help="on | off: an online arrival cuts an offline-only step short at the next layer safepoint [default: on under conserve].")] = None,
    safepoint_every: Annotated[int, typer.Option("--safepoint-every", min=1, help="With layer preemption: a safepoint every k decoder layers.")] = SAFEPOINT_EVERY,
    kv_checkpoint_gib: Annotated[Optional[float], typer.Option("--kv-checkpoint-gib", min=0, help="conserve: host memory for KV checkpoints of offline requests, so a preempted one resumes by loading its KV; 0 turns them off [default: a quarter of the free RAM].")] = None,
    offline_step_ms: Annotated[Optional[float], typer.Option("--offline-step-ms", help="With layer preemption: offline-only step length [default: the smallest step within 5% of peak offline tokens/s, from the profile].")] = None,
    max_offline_inflight: Annotated[int, typer.Option("--max-offline-inflight", min=1, help="Offline items in flight.")] = 32,
    checkpoint_tokens: CheckpointTokensOpt = DEFAULT_CHECKPOINT_TOKENS,
    checkpoint_s: CheckpointSOpt = DEFAULT_CHECKPOINT_S,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local MMLU CSV folder for jobs.")] = None,
    output: OutputOpt = "results",
    profile: Annotated[bool, typer.Option("--profile/--no-profile", help="Load this machine's latency profile (measured once if missing).")] = True,
    step_log: Annotated[Optional[str], typer.Option("--step-log", help="Append every engine step (batch shape, time, the plan's kind and prediction) to this JSON-lines file.")] = None,
    lease_s: Annotated[float, typer.Option("--lease-s", help="Fleet: a claim lasts this long unless renewed; a dead replica's items wait this long.")] = LeaseConfig.lease_s,
    heartbeat_s: Annotated[float, typer.Option("--heartbeat-s", help="Fleet: how often a replica renews its lease (at most half of it).")] = LeaseConfig.heartbeat_s,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Fleet: an item whose engine failed, or whose replica died, this many times is failed.")] = LeaseConfig.max_attempts,
):
    """Serve online OpenAI traffic and run queued eval jobs in its idle time. Example: serve --port 8000"""
    from conserve_bench.serve.server import ServeConfig, serve as run_server

    data_dir = data_dir or default_data_dir()
    cfg = ServeConfig(model=model, host=host, port=port, db_url=db or default_db_url(), policy=policy,
                      api_key=api_key, ttft_slo_ms=ttft_slo_ms, tbt_slo_ms=tbt_slo_ms,
                      slo_margin=slo_margin, quantum_ms=quantum_ms, max_slowdown=max_slowdown,
                      refit=refit, layer_preemption=_on_off("--layer-preemption", layer_preemption),
                      safepoint_every=safepoint_every, kv_checkpoint_gib=kv_checkpoint_gib,
                      offline_step_ms=offline_step_ms,
                      max_offline_inflight=max_offline_inflight,
                      checkpoint_tokens=checkpoint_tokens, checkpoint_s=checkpoint_s,
                      data_dir=os.path.abspath(data_dir) if data_dir else None, output_dir=output,
                      profile=profile, step_log=step_log,
                      leases=_checked(LeaseConfig, lease_s=lease_s, heartbeat_s=heartbeat_s,
                                      max_attempts=max_attempts))
    _store(cfg.db_url)  # a bad --db fails here, before the engine starts
    out.stderr.print(f"serving {model} on http://{host}:{port} (policy {policy})")
    run_server(cfg)


@app.command()
def ci(
    configs: Annotated[list[str], typer.Argument(help="CI config files (YAML), or directories of them.")],
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    db: DbOpt = None,
    run_key: Annotated[Optional[str], typer.Option("--run-key", help="Name of this run (e.g. date + commit): the same key re-attaches to the same jobs and computes only what is missing.")] = None,
    deadline: Annotated[Optional[str], typer.Option("--deadline", help="Exit by this time (ISO 8601 with a zone, or Unix seconds): stop claiming work 15 s before, report INCOMPLETE, exit 4.")] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Like --deadline, as a duration from now: 3600, 90m, 1h30m.")] = None,
    compare_to: Annotated[Optional[str], typer.Option("--compare-to", help="A job id or a results/<job-id>.json: Δ, CI and p per task, paired per document.")] = None,
    write_baseline: Annotated[bool, typer.Option("--write-baseline", help="Write the measured scores into the config files as their baselines.")] = False,
    junit: Annotated[Optional[str], typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    summary: Annotated[Optional[str], typer.Option("--summary", envvar="GITHUB_STEP_SUMMARY", help="Append the markdown report to this file [env GITHUB_STEP_SUMMARY].")] = None,
    commit: Annotated[Optional[str], typer.Option("--commit", envvar="GITHUB_SHA", help="Commit under test, for the report [env GITHUB_SHA].")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local MMLU CSV folder for configs without data_dir [env CONSERVE_BENCH_DATA].")] = None,
    output: OutputOpt = "results",
    max_inflight: InflightOpt = 64,
    as_json: JsonOpt = False,
):
    """Run eval configs, gate them on their baselines, report for CI. Exit 0 pass, 1 regression,
    2 usage or config error, 3 infrastructure, 4 incomplete.

    Example: ci ci/ --run-key "$(date +%F)-$GITHUB_SHA" --time-budget 50m --junit junit.xml
    """
    from conserve_bench.ci.config import load_configs
    from conserve_bench.ci.report import to_junit, to_markdown
    from conserve_bench.ci.run import CIOptions, Stopper, parse_deadline, run_ci

    data_dir = data_dir or default_data_dir()
    options = CIOptions(run_key=run_key, deadline=parse_deadline(deadline, time_budget),
                        compare_to=compare_to, write_baseline=write_baseline, output_dir=output,
                        commit=commit, max_inflight=max_inflight, server=server, api_key=api_key,
                        db_url=db)
    found = load_configs(configs, needs_baselines=not write_baseline,
                         default_data_dir=os.path.abspath(data_dir) if data_dir else None)
    stopper = Stopper(options.deadline)
    with stopper.handling_signals(), out.progress(disable=as_json) as progress:
        bars: dict[str, Any] = {}

        def on_progress(job_id: str, num_done: int, num_total: int) -> None:
            bar = bars.setdefault(job_id, progress.add_task(f"job {job_id}", total=None))
            progress.update(bar, completed=num_done, total=num_total)

        report = run_ci(found, options, stopper=stopper, on_progress=on_progress)
    markdown = to_markdown(report)
    if junit:
        Path(junit).write_text(to_junit(report))
    if summary:
        with open(summary, "a") as f:
            f.write(markdown + "\n")
    out.json(report.to_dict()) if as_json else out.write(markdown)
    raise typer.Exit(report.exit_code)


@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_command(ctx: typer.Context):
    """Run lm-eval's command line with the `conserve` backend; every argument goes to lm-eval.

    Example: lm-eval --model conserve --model_args model=smollm2-135m,data_dir=../shared/data/mmlu
    --tasks mmlu_local_anatomy --limit 10
    """
    from conserve_bench.harness import run_lm_eval

    run_lm_eval(list(ctx.args))


@app.command()
def bench(
    trace: Annotated[Optional[str], typer.Option(help="Azure LLM 2023 trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens).")] = None,
    policies: Annotated[str, typer.Option(help="Comma-separated, run one after another on fresh servers; POLICY:FLAGS runs a policy with its own serve flags, e.g. conserve,conserve:--layer-preemption=off.")] = "online-only,priority,conserve",
    rate: Annotated[Optional[float], typer.Option(help="Online requests/s.")] = None,
    load: Annotated[Optional[float], typer.Option(help="Online rate as a fraction of the measured capacity (0.5 unless --rate).")] = None,
    arrivals: Annotated[str, typer.Option(help="trace (its timestamps, rescaled) | gamma (Gamma process)")] = "trace",
    cv: Annotated[float, typer.Option(help="Gamma inter-arrival CV (1 = Poisson).")] = 2.0,
    trace_offset: Annotated[int, typer.Option("--trace-offset", min=0, help="Skip this many trace requests.")] = 0,
    duration_s: Annotated[float, typer.Option("--duration-s", help="Replay window per policy.")] = 30.0,
    token_scale: Annotated[float, typer.Option("--token-scale", help="Multiply trace token counts.")] = 0.125,
    max_context_tokens: Annotated[int, typer.Option("--max-context-tokens", min=1)] = 512,
    max_generated_tokens: Annotated[int, typer.Option("--max-generated-tokens", min=1)] = 64,
    capacity_requests: Annotated[int, typer.Option("--capacity-requests", min=1, help="Requests of the capacity measurement.")] = 24,
    capacity_concurrency: Annotated[int, typer.Option("--capacity-concurrency", min=1)] = 8,
    drain_timeout_s: Annotated[float, typer.Option("--drain-timeout-s", help="Wait for online requests after the last arrival.")] = 30.0,
    offline_tasks: Annotated[str, typer.Option("--offline-tasks", help="The eval job submitted at t=0.")] = "mmlu",
    offline_limit: Annotated[int, typer.Option("--offline-limit", min=0, help="At most N documents per task (0: all).")] = 20,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", min=0)] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Local MMLU CSV folder (env CONSERVE_BENCH_DATA).")] = None,
    long_prompts: Annotated[int, typer.Option("--long-prompts", min=0, help="Extra offline long-prompt generations.")] = 0,
    long_prompt_tokens: Annotated[int, typer.Option("--long-prompt-tokens", min=1)] = 1536,
    long_generated_tokens: Annotated[int, typer.Option("--long-generated-tokens", min=1)] = 128,
    ttft_slo_ms: Annotated[Optional[float], typer.Option("--ttft-slo-ms", help="TTFT SLO, also given to every serve [default: from this machine's latency profile, serve's rule].")] = None,
    tbt_slo_ms: Annotated[Optional[float], typer.Option("--tbt-slo-ms", help="TBT SLO, also given to every serve [default: from the profile, serve's rule].")] = None,
    max_offline_inflight: Annotated[int, typer.Option("--max-offline-inflight", min=1)] = 32,
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    server: Annotated[Optional[str], typer.Option("--server", help="Bench a running server (one policy, no offline-only phase).")] = None,
    api_key: ApiKeyOpt = None,
    seed: Annotated[int, typer.Option(help="Seeds prompts and Gamma arrivals.")] = 0,
    output: Annotated[str, typer.Option("--output", help="Parent of bench-<timestamp>/.")] = "results",
    kv_checkpoint_gib: Annotated[Optional[float], typer.Option("--kv-checkpoint-gib", min=0, help="Given to every conserve `serve` (a POLICY:FLAGS entry's own wins) [default: serve's].")] = None,
    serve_arg: Annotated[Optional[list[str]], typer.Option("--serve-arg", help="Extra `serve` flag, repeatable: --serve-arg=--quantum-ms=50")] = None,
    db: Annotated[Optional[str], typer.Option("--db", help="Where the machine's latency profile is kept (env CONSERVE_BENCH_DB); each phase gets its own fresh store.")] = None,
    as_json: JsonOpt = False,
):
    """Co-serving benchmark: replay a trace per policy next to an eval job; report and plots.

    Example: bench --trace ../shared/data/traces/azure_llm_2023_conv.csv --data-dir ../shared/data/mmlu
    """
    from conserve_bench.bench.run import BenchConfig, run_bench
    from conserve_bench.bench.report import (GOAL_COLUMNS, KV_RESUME_COLUMNS,
                                             PREEMPTION_COLUMNS, STEP_COLUMNS, TABLE_COLUMNS,
                                             goal_rows, kv_resume_rows, preemption_rows,
                                             step_rows, table_rows)

    data_dir = data_dir or default_data_dir()
    cfg = BenchConfig(
        policies=tuple(p.strip() for p in policies.split(",") if p.strip()), trace=trace,
        arrivals=arrivals, cv=cv, trace_offset=trace_offset, rate=rate, load=load if load is not None or rate is not None else 0.5,
        duration_s=duration_s, token_scale=token_scale, max_context_tokens=max_context_tokens,
        max_generated_tokens=max_generated_tokens, capacity_requests=capacity_requests,
        capacity_concurrency=capacity_concurrency, drain_timeout_s=drain_timeout_s,
        offline_tasks=tuple(t.strip() for t in offline_tasks.split(",") if t.strip()),
        offline_limit=offline_limit or None, num_fewshot=num_fewshot,
        data_dir=os.path.abspath(data_dir) if data_dir else None, long_prompts=long_prompts,
        long_prompt_tokens=long_prompt_tokens, long_generated_tokens=long_generated_tokens,
        ttft_slo_ms=ttft_slo_ms, tbt_slo_ms=tbt_slo_ms, max_offline_inflight=max_offline_inflight,
        model=model, server=server, api_key=api_key, seed=seed, output_dir=output,
        serve_args=tuple(serve_arg or ()), profile_db=db or default_db_url(),
        kv_checkpoint_gib=kv_checkpoint_gib)
    with out.progress(disable=as_json) as progress:
        task = progress.add_task("starting", total=None)
        folder, report = run_bench(cfg, lambda d, done, total: progress.update(
            task, description=d, completed=done, total=total), on_note=progress.console.print)
    if as_json:
        out.json(report)
        return
    for columns, rows, title in ((TABLE_COLUMNS, table_rows(report), report["config"]["workload"]),
                                 (GOAL_COLUMNS, goal_rows(report), report["goal"]),
                                 (STEP_COLUMNS, step_rows(report), "engine steps in the window"),
                                 (PREEMPTION_COLUMNS, preemption_rows(report),
                                  "layer-wise preemption and the server-side online queue"),
                                 (KV_RESUME_COLUMNS, kv_resume_rows(report),
                                  "offline requests preempted for KV blocks, resumed")):
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*row)
        out.stdout.print(table)
    out.stdout.print(f"wrote {folder}/report.json, report.md, latency_cdf.png, offline_throughput.png")


# -- helpers -----------------------------------------------------------------------------------


def _on_off(flag: str, value: str | None) -> bool | None:
    if value is None:
        return None
    if value not in ("on", "off"):
        raise typer.BadParameter(f"{flag} takes on or off, not {value!r}")
    return value == "on"


def _spec(tasks: str, model: str, limit, num_fewshot, data_dir) -> JobSpec:
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    return _checked(JobSpec, tasks=names, model=model, limit=limit, num_fewshot=num_fewshot,
                    data_dir=os.path.abspath(data_dir) if data_dir else None)


def _checked(config_cls, **values):
    """A config dataclass from flags; its own checks become a usage error."""
    try:
        return config_cls(**values)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _submit_remote(client: "JobClient", spec: JobSpec, wait: bool, as_json: bool) -> None:
    job = client.submit(list(spec.tasks), spec.limit, spec.num_fewshot, spec.data_dir)
    if not wait:
        out.json(job) if as_json else out.stdout.print(f"job [bold]{job['id']}[/] queued on {client.base_url}")
        return
    with out.progress(disable=as_json) as progress:
        task = progress.add_task(f"job {job['id']}", total=None)
        final = client.wait(job["id"], lambda done, total: progress.update(task, completed=done, total=total))
    if final["state"] != JobState.DONE:
        raise JobStateError(f"job {job['id']} ended {final['state']}: {final.get('error') or ''}".strip())
    _print_summary(client.results(job["id"]), as_json)


def _run_config(max_inflight: int, checkpoint_tokens: int, checkpoint_s: float) -> RunConfig:
    return RunConfig(max_inflight=max_inflight, checkpoint_tokens=checkpoint_tokens,
                     checkpoint_s=checkpoint_s)


def _run(store: Store, job_id: str, output: str, run_cfg: RunConfig, as_json: bool,
         verbose: bool, kv_checkpoint_gib: float) -> None:
    job = lifecycle.runnable_job(store, job_id)
    lifecycle.check_runs_on(job)  # what needs no engine, before one starts
    model = resolve_model(job.spec.model)
    if not verbose:
        out.capture(Path(output) / f"{job_id}.log")
    phases = Phases(out.stderr, enabled=not as_json)
    with out.progress(disable=as_json) as progress:
        task = progress.add_task("starting engine", total=None)
        with lifecycle.start_engine(model, **lifecycle.checkpoint_overrides(kv_checkpoint_gib)) as engine:
            phases.end("engine ready", f"{model.name}, context {engine.max_model_len} tokens")
            progress.update(task, description="building requests (lm-eval)")
            built = []

            def on_progress(num_done: int, num_total: int, num_tokens: int) -> None:
                if not built and num_total:
                    built.append(num_done)
                    phases.end("requests built", f"{num_total} items, {num_done} already done")
                    progress.update(task, description=f"job {job_id}")
                progress.update(task, completed=num_done, total=num_total, tokens=num_tokens)

            results = lifecycle.run_job(store, job_id, engine, run_cfg, output_dir=output,
                                        on_progress=on_progress)
            meta = results["conserve"]
            tokens = (f", {meta['num_generated_tokens']:,} tokens generated"
                      if meta["num_generated_tokens"] else "")
            phases.end("evaluated", f"{meta['num_items_computed']} items computed, "
                                    f"{meta['items_per_s'] or 0:.2f} items/s{tokens}")
    _print_results(results, as_json)
    if not as_json:
        log = f"; log {out.log_path}" if out.log_path else ""
        out.stdout.print(f"wrote {output}/{job_id}.json{log}", highlight=False)


def _print_results(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.json(lifecycle.results_summary(results))
        return
    table = Table("task", "metric", "value", "stderr", "n-shot")
    for name, values in results["results"].items():
        alias = values.get("alias", name)
        for metric, value in values.items():
            if metric in ("alias", "sample_len") or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            base, _, flt = metric.partition(",")
            stderr = values.get(f"{base}_stderr,{flt}")
            table.add_row(alias, base, f"{value:.4f}",
                          f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "",
                          str(results.get("n-shot", {}).get(name, "")))
    out.stdout.print(table)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """Print a results summary (the job API's form: task -> metric -> value)."""
    if as_json:
        out.json(summary)
        return
    table = Table("task", "metric", "value", "n-shot")
    for name, values in summary["results"].items():
        for metric, value in values.items():
            if "_stderr" not in metric and metric != "sample_len":
                table.add_row(name, metric.split(",")[0], f"{value:.4f}", str(summary["n-shot"].get(name, "")))
    out.stdout.print(table)


def _quiet_libraries() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)  # a command's `typer.Exit(code)` comes back here
    except ConserveError as e:
        out.error(f"error: {e}")  # NOTE: a plain line, so no terminal width wraps it
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors: bad option values, missing arguments
        if message := e.format_message():  # empty after the help that `no_args_is_help` shows
            out.error(f"error: {message}")
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        out.error("interrupted: in-flight items were returned to pending; "
                  "run `conserve-bench resume JOB` to continue")
        sys.exit(130)
    except Exception as e:
        if out.log_path is None:
            raise
        traceback.print_exc()  # NOTE: into the log; the terminal gets one line pointing at it
        out.error(f"error: {lifecycle.one_line_error(e)} (details in {out.log_path})")
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
