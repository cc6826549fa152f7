"""The job commands: `submit`, `resume` (run a job in this process, with progress, or hand it
to servers), `jobs`, `status`, `results`, `cancel` (on a store or a server)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from conserve_bench.cli.base import (MODEL_OPTIONS, AddBosOpt, ApiKeyOpt, DbOpt, DtypeOpt, GpuMemoryOpt,
                                     IncludePathOpt, InflightOpt, Interrupted, JobArg, JsonOpt,
                                     KVCheckpointOpt, MaxModelLenOpt, OutputOpt, PartialSOpt,
                                     PartialTokensOpt, RevisionOpt, SeedOpt, DeterministicOpt, ServerOpt,
                                     TensorParallelOpt, TrustRemoteCodeOpt, VerboseOpt, app, checked,
                                     include_paths, model_options, output_folder, store_for)
from conserve_bench.config import (DEFAULT_MODEL, DEFAULT_PARTIAL_S, DEFAULT_PARTIAL_TOKENS,
                                   JobSpec, RunConfig, default_data_dir)
from conserve_bench.engine import local as local_engine
from conserve_bench.engine.models import model_name, resolve_model
from conserve_bench.errors import JobStateError
from conserve_bench.jobs import lifecycle
from conserve_bench.jobs.results import lm_eval_results, results_file
from conserve_bench.output import Phases, out
from conserve_bench.serve.client import QUERY_WAIT_S, JobClient
from conserve_bench.store import JobState, Store
from conserve_bench.vllm_plugin.overrides import ConnectorConfig, engine_overrides


LogSamplesOpt = Annotated[bool, typer.Option("--log-samples", help="Also write lm-eval's per-sample files (samples_<task>_<date>.jsonl: arguments, responses, documents, metrics) beside the results, as lm-eval's --log_samples; the per-document metric table (<job-id>.samples.jsonl) is always written.")]


@app.command()
def submit(
    ctx: typer.Context,
    tasks: Annotated[str, typer.Argument(help="Comma-separated lm-eval tasks or groups, e.g. mmlu.")],
    model: Annotated[str, typer.Option(help="smollm2-135m, a model directory, or a hub id.")] = DEFAULT_MODEL,
    limit: Annotated[Optional[int], typer.Option(help="At most N documents per task.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", envvar="CONSERVE_BENCH_DATA", help="Local MMLU CSV folder.")] = None,
    include_path: IncludePathOpt = None,
    db: DbOpt = None,
    output: OutputOpt = "results",
    max_inflight: InflightOpt = 64,
    partial_tokens: PartialTokensOpt = DEFAULT_PARTIAL_TOKENS,
    partial_s: PartialSOpt = DEFAULT_PARTIAL_S,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="Follow the job to the end, or only record it (for the `serve` replicas on --db or --server to run).", show_default="--wait; --no-wait with --server")] = None,
    kv_checkpoint_gib: KVCheckpointOpt = 0.0,
    log_samples: LogSamplesOpt = False,
    dtype: DtypeOpt = "auto",
    max_model_len: MaxModelLenOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    add_bos_token: AddBosOpt = False,
    seed: SeedOpt = 0,
    deterministic: DeterministicOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    apply_chat_template: Annotated[bool, typer.Option("--apply-chat-template", help="Render each context with the model's chat template, as lm-eval's --apply_chat_template.")] = False,
    fewshot_as_multiturn: Annotated[Optional[bool], typer.Option("--fewshot-as-multiturn/--no-fewshot-as-multiturn", help="Few-shot examples as chat turns [default: on with --apply-chat-template].")] = None,
    system_instruction: Annotated[Optional[str], typer.Option("--system-instruction", help="A system instruction opening each context, as lm-eval's --system_instruction.")] = None,
):
    """Create a job and run it in-process, or queue it for servers. Example: submit mmlu --limit 5"""
    options = model_options(
        dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, revision=revision,
        trust_remote_code=trust_remote_code, add_bos_token=add_bos_token, seed=seed,
        deterministic=deterministic)
    spec = _spec(tasks, model, limit, num_fewshot, data_dir or default_data_dir(),
                 model_options=options, apply_chat_template=apply_chat_template,
                 fewshot_as_multiturn=fewshot_as_multiturn, system_instruction=system_instruction)
    if server:
        if local := _given(ctx, RUN_HERE_OPTIONS):
            raise typer.BadParameter("the server runs the job with its own settings; drop "
                                     + ", ".join(local), param_hint="--server")
        client = JobClient(server, api_key)
        if _given(ctx, ["model"]) and model_name(model) != model_name(served := client.model()):
            raise typer.BadParameter(f"the server at {client.base_url} serves {served}, not {model}",
                                     param_hint="--model")
        _submit_remote(client, spec, bool(wait), as_json)
        return
    if wait is not False:
        output_folder(output)
    store = store_for(db)
    included = include_paths(include_path)
    job = lifecycle.submit_job(store, spec, include_paths=included)
    if wait is False:
        out.json(job.to_dict()) if as_json else out.stdout.print(
            f"job [bold]{job.id}[/] queued: {', '.join(spec.tasks)} on {spec.model}")
        return
    if not as_json:
        out.stdout.print(f"job [bold]{job.id}[/] submitted: {', '.join(spec.tasks)} on {spec.model}")
    _run(store, job.id, output, _run_config(max_inflight, partial_tokens, partial_s), as_json,
         verbose, kv_checkpoint_gib, included, log_samples=log_samples)


@app.command()
def resume(job_id: JobArg, db: DbOpt = None, output: OutputOpt = "results",
           include_path: IncludePathOpt = None,
           max_inflight: InflightOpt = 64, kv_checkpoint_gib: KVCheckpointOpt = 0.0,
           partial_tokens: PartialTokensOpt = DEFAULT_PARTIAL_TOKENS,
           partial_s: PartialSOpt = DEFAULT_PARTIAL_S, log_samples: LogSamplesOpt = False,
           as_json: JsonOpt = False, verbose: VerboseOpt = False):
    """Continue a job where it stopped: finished items are reused, interrupted generations
    continue from their partials. Example: resume 3f2a9c1d0b7e"""
    store = store_for(db)
    job = store.get_job(job_id)
    if job.state == JobState.DONE:
        _print_results(lifecycle.job_results(store, job_id), as_json)
        return
    output_folder(output)
    _run(store, job_id, output, _run_config(max_inflight, partial_tokens, partial_s), as_json,
         verbose, kv_checkpoint_gib, include_paths(include_path), log_samples=log_samples)


@app.command("jobs")
def list_jobs(db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
              limit: Annotated[int, typer.Option(min=0, help="The newest N jobs; 0: all.")] = lifecycle.JOBS_LISTED,
              as_json: JsonOpt = False):
    """List jobs, newest first, and the live replicas of the store."""
    found = JobClient(server, api_key, max_wait_s=QUERY_WAIT_S).jobs(limit) if server else lifecycle.fleet_overview(store_for(db), limit)
    if as_json:
        out.json(found)
        return
    table = Table("id", "state", "done/total", "failed", "tasks", "model")
    for j in found["jobs"]:
        table.add_row(j["id"], j["state"], f"{j['done']}/{j['total']}", str(j["failed"] or ""),
                      ",".join(j["tasks"]), j["model"])
    out.stdout.print(table)
    num_jobs = found.get("num_jobs", len(found["jobs"]))  # NOTE: a server older than `num_jobs`
    if len(found["jobs"]) < num_jobs:
        out.stdout.print(f"the newest {len(found['jobs'])} of {num_jobs} jobs; --limit 0 lists all")
    if found["replicas"]:
        live = Table("live replica", "label", "job", "heartbeat", title="live replicas")
        for r in found["replicas"]:
            live.add_row(r["id"], r["label"], r["job"] or "-", f"{r['heartbeat_age_s']:.0f}s ago")
        out.stdout.print(live)


@app.command()
def status(job_id: JobArg, db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
           as_json: JsonOpt = False):
    """Show one job's state, progress per replica, and items that failed every attempt."""
    job = JobClient(server, api_key, max_wait_s=QUERY_WAIT_S).status(job_id) if server else lifecycle.job_status(store_for(db), job_id)
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
    """Print a finished job's scores; `--json`: lm-eval's results object, as in its results
    file (the job's own record under `conserve`)."""
    if server:
        _print_results(JobClient(server, api_key, max_wait_s=QUERY_WAIT_S).results(job_id), as_json)
    else:
        _print_results(lifecycle.job_results(store_for(db), job_id), as_json)


@app.command()
def cancel(job_id: JobArg, db: DbOpt = None, server: ServerOpt = None, api_key: ApiKeyOpt = None,
           as_json: JsonOpt = False):
    """Cancel a job; its finished items stay stored and reusable."""
    job = JobClient(server, api_key, max_wait_s=QUERY_WAIT_S).cancel(job_id) if server else lifecycle.cancel_job(store_for(db), job_id).to_dict()
    if as_json:
        out.json(job)
    else:
        out.stdout.print(f"{job['id']}: cancelled at {job['done']}/{job['total']} items")


# -- helpers ----------------------------------------------------------------------------------


# `submit`'s options for a job run in this process, which `--server` cannot honour (a server
# loads its model as its own options say)
RUN_HERE_OPTIONS = ("db", "output", "max_inflight", "partial_tokens", "partial_s",
                    "kv_checkpoint_gib", "verbose", "include_path", "log_samples", *MODEL_OPTIONS)


def _given(ctx: typer.Context, names) -> list[str]:
    """Those of the options `names` set on the command line (not by default or the
    environment), as flags."""
    return [f"--{name.replace('_', '-')}" for name in names
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]


def _spec(tasks: str, model: str, limit, num_fewshot, data_dir, **chat) -> JobSpec:
    """`chat`: JobSpec's chat fields (`apply_chat_template`, ...)."""
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    return checked(JobSpec, tasks=names, model=model, limit=limit, num_fewshot=num_fewshot,
                   data_dir=os.path.abspath(data_dir) if data_dir else None, **chat)


def _submit_remote(client: "JobClient", spec: JobSpec, wait: bool, as_json: bool) -> None:
    job = client.submit(list(spec.tasks), spec.limit, spec.num_fewshot, spec.data_dir,
                        apply_chat_template=spec.apply_chat_template,
                        fewshot_as_multiturn=spec.fewshot_as_multiturn,
                        system_instruction=spec.system_instruction)
    if not wait:
        out.json(job) if as_json else out.stdout.print(f"job [bold]{job['id']}[/] queued on {client.base_url}")
        return
    with out.progress(disable=as_json) as progress:
        task = progress.add_task(f"job {job['id']}", total=None)
        final = client.wait(job["id"], lambda done, total: progress.update(task, completed=done, total=total))
    if final["state"] != JobState.DONE:
        raise JobStateError(f"job {job['id']} ended {final['state']}: {final.get('error') or ''}".strip())
    _print_results(client.results(job["id"]), as_json)


def _run_config(max_inflight: int, partial_tokens: int, partial_s: float) -> RunConfig:
    return RunConfig(max_inflight=max_inflight, partial_tokens=partial_tokens,
                     partial_s=partial_s)


def _run(store: Store, job_id: str, output: str, run_cfg: RunConfig, as_json: bool,
         verbose: bool, kv_checkpoint_gib: float, included: tuple[str, ...] = (), *,
         log_samples: bool = False) -> None:
    try:
        _run_job(store, job_id, output, run_cfg, as_json, verbose, kv_checkpoint_gib, included,
                 log_samples)
    except Interrupted as e:
        e.job_id = job_id  # NOTE: its items were given back on the way out (`lifecycle.run_job`)
        raise


def _checkpoint_overrides(kv_checkpoint_gib: float, tensor_parallel_size: int = 1) -> dict[str, Any]:
    """What keeps offline requests' KV checkpoints in a host pool of `kv_checkpoint_gib`
    (0: none, and vLLM's own scheduler): the connector (one worker only), and
    `ConserveScheduler` with no policy, which schedules as vLLM does."""
    if not kv_checkpoint_gib:
        return {}
    return engine_overrides(connector=ConnectorConfig(layer_preemption=False,
                                                      checkpoint_gib=kv_checkpoint_gib),
                            tensor_parallel_size=tensor_parallel_size)


def _run_job(store: Store, job_id: str, output: str, run_cfg: RunConfig, as_json: bool,
             verbose: bool, kv_checkpoint_gib: float, included: tuple[str, ...],
             log_samples: bool = False) -> None:
    job = lifecycle.runnable_job(store, job_id)
    lifecycle.check_runs_on(job)  # what needs no engine, before one starts
    model = resolve_model(job.spec.model)
    if not verbose:
        out.capture(Path(output) / f"{job_id}.log")
    phases = Phases(out.stderr, enabled=not as_json)
    with out.progress(disable=as_json) as progress:
        task = progress.add_task("starting engine", total=None)
        options = job.spec.model_options  # NOTE: stored with the job: `resume` loads it alike
        with local_engine.start_engine(model, options=options, **_checkpoint_overrides(
                kv_checkpoint_gib, options.tensor_parallel_size)) as engine:
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
                                        on_progress=on_progress, include_paths=included,
                                        log_samples=log_samples)
            meta = results["conserve"]
            tokens = (f", {meta['num_generated_tokens']:,} tokens generated"
                      if meta["num_generated_tokens"] else "")
            phases.end("evaluated", f"{meta['num_items_computed']} items computed, "
                                    f"{meta['items_per_s'] or 0:.2f} items/s{tokens}")
    _print_results(results, as_json)
    if not as_json:
        log = f"; log {out.log_path}" if out.log_path else ""
        written = Path(output) / results_file(results)
        out.stdout.print(f"wrote {written} and {output}/{job_id}.json{log}", highlight=False)


def _print_results(results: dict[str, Any], as_json: bool) -> None:
    """A job's scores as a table, or (`as_json`) lm-eval's results object, as in its file."""
    if as_json:
        out.json(lm_eval_results(results))
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

