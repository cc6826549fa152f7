"""`bench`: the co-serving benchmark (`bench.phases`), its tables printed."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.table import Table

from conserve_bench.cli.base import ApiKeyOpt, JsonOpt, app, output_folder
from conserve_bench.config import DEFAULT_DB_URL, DEFAULT_MODEL, default_data_dir, default_db_url
from conserve_bench.output import out


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
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", envvar="CONSERVE_BENCH_DATA", help="Local MMLU CSV folder.")] = None,
    long_prompts: Annotated[int, typer.Option("--long-prompts", min=0, help="Extra offline long-prompt generations.")] = 0,
    long_prompt_tokens: Annotated[int, typer.Option("--long-prompt-tokens", min=1)] = 1536,
    long_generated_tokens: Annotated[int, typer.Option("--long-generated-tokens", min=1)] = 128,
    ttft_slo_ms: Annotated[Optional[float], typer.Option("--ttft-slo-ms", help="TTFT SLO, also given to every serve.", show_default="from this machine's latency profile, serve's rule")] = None,
    tbt_slo_ms: Annotated[Optional[float], typer.Option("--tbt-slo-ms", help="TBT SLO, also given to every serve.", show_default="from the profile, serve's rule")] = None,
    max_offline_inflight: Annotated[int, typer.Option("--max-offline-inflight", min=1)] = 32,
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    server: Annotated[Optional[str], typer.Option("--server", help="Bench a running server (one policy, no offline-only phase).")] = None,
    api_key: ApiKeyOpt = None,
    seed: Annotated[int, typer.Option(help="Seeds prompts and Gamma arrivals.")] = 0,
    output: Annotated[str, typer.Option("--output", help="Parent of bench-<timestamp>/.")] = "results",
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Run the policies this many times, alternated (online-only, conserve, online-only#2, ...), and pool each over its rounds: the host's drift between phases then falls on every policy alike.")] = 1,
    kv_checkpoint_gib: Annotated[Optional[float], typer.Option("--kv-checkpoint-gib", min=0, help="Given to every conserve `serve` (a POLICY:FLAGS entry's own wins).", show_default="serve's")] = None,
    serve_arg: Annotated[Optional[list[str]], typer.Option("--serve-arg", help="Extra `serve` flag, repeatable: --serve-arg=--quantum-ms=50")] = None,
    db: Annotated[Optional[str], typer.Option("--db", envvar="CONSERVE_BENCH_DB", show_default=DEFAULT_DB_URL, help="Where the machine's latency profile is kept; each phase gets its own fresh store.")] = None,
    as_json: JsonOpt = False,
):
    """Co-serving benchmark: replay a trace per policy next to an eval job; report and plots.

    Example: bench --trace ../shared/data/traces/azure_llm_2023_conv.csv --data-dir ../shared/data/mmlu
    """
    from conserve_bench.bench.setting import BenchSetting
    from conserve_bench.bench.phases import run_bench
    from conserve_bench.bench.tables import (CLASS_COLUMNS, GOAL_COLUMNS, KV_RESUME_COLUMNS,
                                             PREEMPTION_COLUMNS, POOLED_COLUMNS, STEP_COLUMNS,
                                             TABLE_COLUMNS, class_rows, goal_rows, kv_resume_rows,
                                             pooled_rows, preemption_rows, step_rows, table_rows)

    data_dir = data_dir or default_data_dir()
    output_folder(output)
    cfg = BenchSetting(
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
        kv_checkpoint_gib=kv_checkpoint_gib, rounds=rounds)
    with out.progress(disable=as_json) as progress:
        task = progress.add_task("starting", total=None)
        folder, report = run_bench(cfg, lambda d, done, total: progress.update(
            task, description=d, completed=done, total=total), on_note=progress.console.print)
    if as_json:
        out.json(report)
        return
    for columns, rows, title in ((TABLE_COLUMNS, table_rows(report), report["config"]["workload"]),
                                 (GOAL_COLUMNS, goal_rows(report), report["goal"]),
                                 (POOLED_COLUMNS, pooled_rows(report), "each entry over its rounds"),
                                 (STEP_COLUMNS, step_rows(report), "engine steps in the window"),
                                 (CLASS_COLUMNS, class_rows(report),
                                  "where the latency model is wrong: measured / predicted by step class"),
                                 (PREEMPTION_COLUMNS, preemption_rows(report),
                                  "layer-wise preemption and the server-side online queue"),
                                 (KV_RESUME_COLUMNS, kv_resume_rows(report),
                                  "offline requests preempted for KV blocks, resumed")):
        if columns in (POOLED_COLUMNS, CLASS_COLUMNS) and not rows:
            continue  # NOTE: one round: nothing pooled; no policy planned: no predictions
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*row)
        out.stdout.print(table)
    out.stdout.print(f"wrote {folder}/report.json, report.md, latency_cdf.png, offline_throughput.png")
