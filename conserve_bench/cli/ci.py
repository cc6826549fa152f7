"""Evaluation driven by other tools: `ci` (nightly configs gated on their baselines) and
`lm-eval` (lm-eval's own command line with the `conserve` backend).

`ci`'s exit code is its report's (`ci.ExitCode`); a crash exits 3 like any infrastructure
failure, in one line (`--verbose`: with its traceback), so that no crash reads as a regression.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from conserve_bench.cli.base import (ApiKeyOpt, DbOpt, InflightOpt, JsonOpt, OutputOpt, ServerOpt,
                                     app, output_folder, show_tracebacks)
from conserve_bench.config import default_data_dir
from conserve_bench.output import out
from conserve_bench.serve.client import SERVER_WAIT_S


@app.command()
def ci(
    configs: Annotated[list[str], typer.Argument(help="CI config files (YAML), or directories of them.")],
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    server_wait: Annotated[float, typer.Option("--server-wait", min=0, help="Seconds to wait for a --server that is down or restarting (refused connections, 503 while its store is out) before the run is an infrastructure error (exit 3); 0: fail at once.")] = SERVER_WAIT_S,
    db: DbOpt = None,
    run_key: Annotated[Optional[str], typer.Option("--run-key", help="Name of this run (e.g. date + commit): the same key re-attaches to the same jobs and computes only what is missing.")] = None,
    deadline: Annotated[Optional[str], typer.Option("--deadline", help="Exit by this time (ISO 8601 with a zone, or Unix seconds): stop claiming work 15 s before, report INCOMPLETE, exit 4.")] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Like --deadline, as a duration from now: 3600, 90m, 1h30m.")] = None,
    compare_to: Annotated[Optional[str], typer.Option("--compare-to", help="A job id or a results/<job-id>.json: Δ, CI and p per task, paired per document.")] = None,
    write_baseline: Annotated[bool, typer.Option("--write-baseline", help="Write the measured scores into the config files as their baselines.")] = False,
    junit: Annotated[Optional[str], typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    summary: Annotated[Optional[str], typer.Option("--summary", envvar="GITHUB_STEP_SUMMARY", help="Append the markdown report to this file.")] = None,
    commit: Annotated[Optional[str], typer.Option("--commit", envvar="GITHUB_SHA", help="Commit under test, for the report.")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", envvar="CONSERVE_BENCH_DATA", help="Local MMLU CSV folder for configs without data_dir.")] = None,
    output: OutputOpt = "results",
    max_inflight: InflightOpt = 64,
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", callback=show_tracebacks, help="On an unexpected error, print its traceback too (else one line, exit 3).")] = False,
):
    """Run eval configs, gate them on their baselines, report for CI. Exit 0 pass, 1 regression
    (or a NaN or infinite score), 2 usage or config error, 3 infrastructure (a server down past
    --server-wait, a dead engine, a crash), 4 incomplete.

    Example: ci ci/ --run-key "$(date +%F)-$GITHUB_SHA" --time-budget 50m --junit junit.xml
    """
    from conserve_bench.ci.suite import load_configs
    from conserve_bench.ci.report import to_junit, to_markdown
    from conserve_bench.ci.nightly import CIOptions, Stopper, parse_deadline, run_ci

    data_dir = data_dir or default_data_dir()
    output_folder(output)
    for flag, path in (("--junit", junit), ("--summary", summary)):
        writable_file(flag, path)
    options = CIOptions(run_key=run_key, deadline=parse_deadline(deadline, time_budget),
                        compare_to=compare_to, write_baseline=write_baseline, output_dir=output,
                        commit=commit, max_inflight=max_inflight, server=server, api_key=api_key,
                        server_wait_s=server_wait, db_url=db)
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


def writable_file(flag: str, path: str | None) -> None:
    """A report file's folder exists and is writable, checked before the run rather than
    when the report is written at its end (a crash then would hide the verdict)."""
    if path is None:
        return
    folder = Path(path).absolute().parent
    problem = (f"{path} is a folder" if Path(path).is_dir()
               else f"{folder} is not a folder" if not folder.is_dir()
               else f"{folder} is not writable" if not os.access(folder, os.W_OK | os.X_OK) else None)
    if problem:
        raise typer.BadParameter(problem, param_hint=f"'{flag}'")


@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_command(ctx: typer.Context):
    """Run lm-eval's command line with the `conserve` backend; every argument goes to lm-eval.

    Example: lm-eval --model conserve --model_args model=smollm2-135m,data_dir=../shared/data/mmlu
    --tasks mmlu_local_anatomy --limit 10
    """
    from conserve_bench.harness import run_lm_eval

    run_lm_eval(list(ctx.args))
