"""The `conserve-bench` command line: each command parses, calls one function, prints.

Errors the user can fix are `ConserveError`s, printed by `main` as one line on stderr with a
non-zero exit; no traceback. `--json` prints one machine-readable JSON object.

    conserve-bench submit mmlu_anatomy --limit 20 --data-dir ../shared/data/mmlu
    conserve-bench status 3f2a9c1d0b7e --json
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                           TextColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from . import jobs
from .config import RunConfig, JobSpec, default_data_dir, default_db_url, DEFAULT_MODEL
from .errors import ConserveError
from .models import resolve_model
from .store import Store

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run LLM evaluation suites on the idle cycles of a serving GPU.")
console = Console()
err_console = Console(stderr=True)

DbOpt = Annotated[Optional[str], typer.Option("--db", help="Job store URL [env CONSERVE_BENCH_DB; default sqlite:///conserve.db]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
JobArg = Annotated[str, typer.Argument(help="Job id.")]
OutputOpt = Annotated[str, typer.Option("--output", help="Directory for results/<job-id>.json.")]
InflightOpt = Annotated[int, typer.Option("--max-inflight", min=1, help="Work items in flight at once.")]


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
    as_json: JsonOpt = False,
):
    """Create a job and run it to completion in-process. Example: submit mmlu --limit 5"""
    spec = _spec(tasks, model, limit, num_fewshot, data_dir or default_data_dir())
    store = _store(db)
    job = jobs.submit_job(store, spec)
    if not as_json:
        console.print(f"job [bold]{job.id}[/] submitted: {', '.join(spec.tasks)} on {spec.model}")
    _run(store, job.id, output, max_inflight, as_json)


@app.command()
def resume(job_id: JobArg, db: DbOpt = None, output: OutputOpt = "results",
           max_inflight: InflightOpt = 64, as_json: JsonOpt = False):
    """Continue a job where it stopped; finished items are reused. Example: resume 3f2a9c1d0b7e"""
    store = _store(db)
    job = store.get_job(job_id)
    if job.state == "done":
        _print_results(jobs.job_results(store, job_id), as_json)
        return
    _run(store, job_id, output, max_inflight, as_json)


@app.command("jobs")
def list_jobs(db: DbOpt = None, as_json: JsonOpt = False):
    """List jobs, newest first."""
    found = _store(db).list_jobs()
    if as_json:
        _print_json({"jobs": [j.to_dict() for j in found]})
        return
    table = Table("id", "state", "done/total", "tasks", "model")
    for j in found:
        table.add_row(j.id, j.state, f"{j.num_done}/{j.num_total}", ",".join(j.spec.tasks), j.spec.model)
    console.print(table)


@app.command()
def status(job_id: JobArg, db: DbOpt = None, as_json: JsonOpt = False):
    """Show one job's state and progress."""
    job = _store(db).get_job(job_id)
    if as_json:
        _print_json(job.to_dict())
        return
    console.print(f"{job.id}: {job.state}, {job.num_done}/{job.num_total} items, "
                  f"tasks {','.join(job.spec.tasks)}" + (f" ({job.error})" if job.error else ""))


@app.command()
def results(job_id: JobArg, db: DbOpt = None, as_json: JsonOpt = False):
    """Print a finished job's scores."""
    _print_results(jobs.job_results(_store(db), job_id), as_json)


@app.command()
def cancel(job_id: JobArg, db: DbOpt = None, as_json: JsonOpt = False):
    """Cancel a job; its finished items stay stored and reusable."""
    job = jobs.cancel_job(_store(db), job_id)
    if as_json:
        _print_json(job.to_dict())
    else:
        console.print(f"{job.id}: cancelled at {job.num_done}/{job.num_total} items")


# -- helpers -----------------------------------------------------------------------------------


def _spec(tasks: str, model: str, limit, num_fewshot, data_dir) -> JobSpec:
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    try:
        return JobSpec(tasks=names, model=model, limit=limit, num_fewshot=num_fewshot,
                       data_dir=os.path.abspath(data_dir) if data_dir else None)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _run(store: Store, job_id: str, output: str, max_inflight: int, as_json: bool) -> None:
    job = jobs.runnable_job(store, job_id)
    model = resolve_model(job.spec.model)
    with _progress(disable=as_json) as progress:
        task = progress.add_task("starting engine", total=None)
        with jobs.start_engine(model) as engine:
            progress.update(task, description=f"job {job_id}")

            def on_progress(num_done: int, num_total: int) -> None:
                progress.update(task, completed=num_done, total=num_total)

            results = jobs.run_job(store, job_id, engine, RunConfig(max_inflight=max_inflight),
                                   output_dir=output, on_progress=on_progress)
    _print_results(results, as_json)
    if not as_json:
        meta = results["conserve"]
        console.print(f"wrote {output}/{job_id}.json  ({meta['num_items_computed']} items "
                      f"computed in {meta['wall_s']:.1f}s, {meta['items_per_s'] or 0:.2f} items/s)")


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} req/s" if task.speed else "-- req/s", style="cyan")


def _progress(disable: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(), TimeRemainingColumn(), console=err_console,
                    disable=disable, transient=False)


def _print_results(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json({"id": results["conserve"]["job"]["id"], "results": jobs.task_metrics(results),
                     "n-shot": results.get("n-shot", {})})
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
    console.print(table)


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


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
        app(standalone_mode=False)
    except ConserveError as e:
        sys.stderr.write(f"error: {e}\n")  # NOTE: plain write, so no terminal width wraps it
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted: in-flight items were returned to pending; "
                          "run `conserve-bench resume JOB` to continue")
        sys.exit(130)
    except (typer.BadParameter, typer.Exit) as e:
        raise
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
