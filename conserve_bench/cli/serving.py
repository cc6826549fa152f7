"""The serving commands: `profile` (the engine's latency model for this machine) and `serve`
(online traffic, with queued jobs in its idle time)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from conserve_bench.cli.base import (AddBosOpt, ApiKeyOpt, DbOpt, DtypeOpt, GpuMemoryOpt, IncludePathOpt,
                                     MaxModelLenOpt, OutputOpt, PartialSOpt, PartialTokensOpt, RevisionOpt,
                                     SeedOpt, DeterministicOpt, TensorParallelOpt, TrustRemoteCodeOpt, VerboseOpt, app,
                                     checked, include_paths, model_options, on_off, output_folder,
                                     store_for)
from conserve_bench.config import (DEFAULT_MODEL, DEFAULT_PARTIAL_S, DEFAULT_PARTIAL_TOKENS,
                                   LeaseConfig, ServePolicy, default_data_dir, default_db_url)
from conserve_bench.output import out
from conserve_bench.sched.policy import DEFAULT_MARGIN, DEFAULT_TAIL_QUANTILE
from conserve_bench.serve.guard import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_UPLOAD_BYTES


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller sweep (about 60 s of profiling on an idle 2-core CPU).")] = False,
    show: Annotated[bool, typer.Option("--show", help="Print the stored profile for this machine; measure nothing.")] = False,
    db: DbOpt = None,
    output: Annotated[str, typer.Option("--output", help="Directory for profile.log (vLLM's own output).")] = "results",
    dtype: DtypeOpt = "auto",
    max_model_len: MaxModelLenOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
):
    """Measure the engine's step latency and fit the latency model. Example: profile --quick"""
    from conserve_bench.profiling import profiler

    options = model_options(dtype=dtype, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization,
                            tensor_parallel_size=tensor_parallel_size, revision=revision,
                            trust_remote_code=trust_remote_code)
    store = store_for(db)
    refit = None
    if show:
        found, refit = profiler.show_profile(store, model, options)
    else:
        if not verbose:
            out.capture(Path(output_folder(output)) / "profile.log")
        with out.progress() as progress:
            task = progress.add_task("starting engine", total=None)
            result = profiler.run_profile(
                store, model, quick,
                on_started=lambda: progress.update(task, description="profiling"),
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                options=options,
            )
        found = result.profile
        log = f"; log {out.log_path}" if out.log_path else ""
        out.stderr.print(f"swept {len(result.sweep.samples)} steps in {result.sweep.wall_s:.0f}s{log}",
                         highlight=False)
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
    policy: Annotated[ServePolicy, typer.Option(help="How online traffic and offline jobs share the engine.")] = ServePolicy.CONSERVE,
    api_key: ApiKeyOpt = None,
    public_metrics: Annotated[bool, typer.Option("--public-metrics", help="With --api-key: serve /metrics without the key (a Prometheus scraper on a trusted network); every other route but /health needs it.")] = False,
    max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", min=1, help="Largest request body on any route, in bytes; larger ones get 413 before they are parsed.")] = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_file_bytes: Annotated[int, typer.Option("--max-batch-file-bytes", min=1, help="Largest file uploaded to /v1/files (a batch's input), in bytes; it is kept in the store.")] = DEFAULT_MAX_UPLOAD_BYTES,
    ttft_slo_ms: Annotated[Optional[float], typer.Option("--ttft-slo-ms", help="Online TTFT target; given (or --tbt-slo-ms), conserve spends it on offline work.", show_default="counted only, 2x a 1024-token prefill, from the profile")] = None,
    tbt_slo_ms: Annotated[Optional[float], typer.Option("--tbt-slo-ms", help="Online TBT target; given, conserve fills steps up to it.", show_default="counted only, 5x a decode step, from the profile")] = None,
    slo_margin: Annotated[float, typer.Option("--slo-margin", help="conserve with SLOs: offline work fills steps up to (1 - margin) x the TBT target.")] = DEFAULT_MARGIN,
    quantum_ms: Annotated[Optional[float], typer.Option("--quantum-ms", help="conserve: how long an online arrival may wait behind an offline-only step (with --layer-preemption off, the longest such step; on, a step is let run out rather than cut once what is left of it takes no longer; 0: always cut).", show_default="the slowdown share of the 90th-percentile online prompt's prefill; with SLOs, 25% of the TTFT target")] = None,
    max_slowdown: Annotated[Optional[float], typer.Option("--max-slowdown", help="conserve without SLOs: the share offline work may add to online steps.", show_default="0.05, from the 1.05x bound (less the profile's error with --tail-quantile 0)")] = None,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="conserve: plan with the latency model refitted from live steps while it predicts them better.")] = True,
    warm_start: Annotated[bool, typer.Option("--warm-start/--no-warm-start", help="conserve: start from the live refit, size corrections and tail margins the last server on this profile stored, not from the idle profile.")] = True,
    tail_quantile: Annotated[float, typer.Option("--tail-quantile", help="conserve: size offline work so that this quantile of each step kind's live time, not the latency model's prediction, stays within the budget; 0: plan on the prediction.")] = DEFAULT_TAIL_QUANTILE,
    layer_preemption: Annotated[Optional[str], typer.Option("--layer-preemption", help="on | off: an online arrival cuts an offline-only step short at the next layer safepoint.", show_default="on under conserve")] = None,
    safepoint_every: Annotated[Optional[int], typer.Option("--safepoint-every", min=1, help="With layer preemption: a safepoint every k decoder layers.", show_default="1 on the CPU, 4 where a safepoint waits for the GPU")] = None,
    kv_checkpoint_gib: Annotated[Optional[float], typer.Option("--kv-checkpoint-gib", min=0, help="conserve: host memory for KV checkpoints of offline requests, so a preempted one resumes by loading its KV; 0 turns them off.", show_default="a quarter of the free RAM")] = None,
    offline_step_ms: Annotated[Optional[float], typer.Option("--offline-step-ms", help="With layer preemption: offline-only step length.", show_default="the shortest step within 5% of peak offline tokens/s, from the profile (a prompt's attention counted once, however chunked)")] = None,
    max_offline_inflight: Annotated[int, typer.Option("--max-offline-inflight", min=1, help="Offline items in flight.")] = 32,
    max_batch_inflight: Annotated[Optional[int], typer.Option("--max-batch-inflight", min=1, help="An OpenAI batch's lines in flight.", show_default="1.5x the engine's max_num_seqs")] = None,
    partial_tokens: PartialTokensOpt = DEFAULT_PARTIAL_TOKENS,
    partial_s: PartialSOpt = DEFAULT_PARTIAL_S,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", envvar="CONSERVE_BENCH_DATA", help="Local MMLU CSV folder for jobs.")] = None,
    include_path: IncludePathOpt = None,
    data_root: Annotated[Optional[list[str]], typer.Option("--data-root", metavar="DIR", help="A folder at or below which job API clients may name a data_dir (repeatable).", show_default="--data-dir")] = None,
    output: OutputOpt = "results",
    profile: Annotated[bool, typer.Option("--profile/--no-profile", help="Load this machine's latency profile (measured once if missing).")] = True,
    step_log: Annotated[Optional[str], typer.Option("--step-log", help="Append every engine step (batch shape, time, the plan's kind and prediction) to this JSON-lines file.")] = None,
    lease_s: Annotated[float, typer.Option("--lease-s", help="Fleet: a claim lasts this long unless renewed; a dead replica's items wait this long.")] = LeaseConfig.lease_s,
    heartbeat_s: Annotated[float, typer.Option("--heartbeat-s", help="Fleet: how often a replica renews its lease (at most half of it).")] = LeaseConfig.heartbeat_s,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Fleet: an item whose engine failed, or whose replica died, this many times is failed.")] = LeaseConfig.max_attempts,
    dtype: DtypeOpt = "auto",
    max_model_len: MaxModelLenOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    add_bos_token: AddBosOpt = False,
    seed: SeedOpt = 0,
    deterministic: DeterministicOpt = False,
    num_gpu_blocks_override: Annotated[Optional[int], typer.Option("--num-gpu-blocks-override", min=1, help="vLLM's own: this many KV cache blocks instead of what memory holds (to test preemption).")] = None,
):
    """Serve online OpenAI traffic and run queued eval jobs in its idle time. Example: serve --port 8000"""
    from conserve_bench.serve.server import ServeConfig, serve as run_server

    data_dir = data_dir or default_data_dir()
    cfg = ServeConfig(model=model, host=host, port=port, db_url=db or default_db_url(), policy=policy,
                      api_key=api_key, public_metrics=public_metrics,
                      max_request_bytes=max_request_bytes, max_batch_file_bytes=max_batch_file_bytes, ttft_slo_ms=ttft_slo_ms, tbt_slo_ms=tbt_slo_ms,
                      slo_margin=slo_margin, quantum_ms=quantum_ms, max_slowdown=max_slowdown,
                      refit=refit, warm_start=warm_start, tail_quantile=tail_quantile, layer_preemption=on_off("--layer-preemption", layer_preemption),
                      safepoint_every=safepoint_every, kv_checkpoint_gib=kv_checkpoint_gib,
                      offline_step_ms=offline_step_ms,
                      max_offline_inflight=max_offline_inflight, max_batch_inflight=max_batch_inflight,
                      partial_tokens=partial_tokens, partial_s=partial_s,
                      data_dir=os.path.abspath(data_dir) if data_dir else None, output_dir=output,
                      include_paths=include_paths(include_path),
                      data_roots=tuple(map(os.path.abspath, data_root or ())),
                      profile=profile, step_log=step_log,
                      leases=checked(LeaseConfig, lease_s=lease_s, heartbeat_s=heartbeat_s,
                                     max_attempts=max_attempts),
                      model_options=model_options(
                          dtype=dtype, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization,
                          tensor_parallel_size=tensor_parallel_size, revision=revision,
                          trust_remote_code=trust_remote_code, add_bos_token=add_bos_token, seed=seed,
                          deterministic=deterministic),
                      engine_overrides={"num_gpu_blocks": num_gpu_blocks_override} if num_gpu_blocks_override else {})
    output_folder(output)  # a bad --db or --output fails here, before the engine starts
    store_for(cfg.db_url)
    out.stderr.print(f"serving {model} on http://{host}:{port} (policy {policy})")
    run_server(cfg)
