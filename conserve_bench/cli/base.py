"""What the commands share: the typer app, the options several commands take, the helpers
that turn flags into configs (a config's own check becomes a usage error), and how Ctrl-C and
SIGTERM stop a command (`interrupts`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from conserve_bench.config import DEFAULT_DB_URL, ModelOptions, default_db_url
from conserve_bench.store import Store

# NOTE: `rich_markup_mode=None`: help texts are plain text, printed as written; rich markup
# would take any "[word ...]" in them for a style tag and drop it
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"max_content_width": 120},
                  help="Run LLM evaluation suites on the idle cycles of a serving GPU.")


def output_folder(value: str) -> str:
    """`--output`, checked by a command that will write there, before it records a job or
    starts an engine (nothing is made yet): a folder results and logs can be written in, or
    made in. A usage error otherwise, rather than a traceback when the first file is written,
    hours of work later."""
    path = Path(value).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = ("is a file, not a folder" if not existing.is_dir()
               else "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise typer.BadParameter(f"{existing} {problem}", param_hint="'--output'")
    return value


DbOpt = Annotated[Optional[str], typer.Option("--db", envvar="CONSERVE_BENCH_DB", show_default=DEFAULT_DB_URL, help="Job store URL.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
JobArg = Annotated[str, typer.Argument(help="Job id.")]
OutputOpt = Annotated[str, typer.Option("--output", help="Where results go, in lm-eval's output layout (<model>/results_<date>.json; with --log-samples, samples_<task>_<date>.jsonl), with the same object as <job-id>.json for scripts; submit and resume keep the job's log, <job-id>.log, beside it.")]
InflightOpt = Annotated[int, typer.Option("--max-inflight", min=1, help="Work items in flight at once.")]
KVCheckpointOpt = Annotated[float, typer.Option("--kv-checkpoint-gib", min=0, help="Host memory for KV checkpoints, so a request vLLM preempts (its KV cache full) resumes by loading its KV instead of recomputing it; 0 turns them off.", show_default="0 in-process, where no online work preempts; serve's is a quarter of the free RAM")]
ServerOpt = Annotated[Optional[str], typer.Option("--server", help="URL of a running `conserve-bench serve`.")]
def show_tracebacks(ctx: typer.Context, verbose: bool) -> bool:
    """`--verbose`'s callback: an unexpected error then shows its traceback (`cli.main`)."""
    if verbose and isinstance(ctx.obj, dict):
        ctx.obj["tracebacks"] = True
    return verbose


IncludePathOpt = Annotated[Optional[list[str]], typer.Option("--include-path", metavar="DIR", help="A folder of lm-eval task YAML whose tasks may be named (repeatable), as lm-eval's --include_path.")]


def include_paths(folders: list[str] | None) -> tuple[str, ...]:
    """`--include-path` folders, absolute (a job keeps them no further than this run)."""
    return tuple(os.path.abspath(folder) for folder in folders or ())


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", callback=show_tracebacks, help="Show vLLM's and lm-eval's own output on the terminal instead of in a log under --output (<job-id>.log; profile's: profile.log), and an unexpected error's traceback.")]
PartialTokensOpt = Annotated[int, typer.Option("--partial-tokens", min=0, help="Save the tokens of each generation in flight (a partial) every N new tokens, so an interrupted one continues; 0: off (it starts over).")]
PartialSOpt = Annotated[float, typer.Option("--partial-s", min=0.001, help="...or every S seconds, whichever comes first.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="CONSERVE_BENCH_API_KEY", help="Bearer key of the server.")]
# How the model is loaded (`config.ModelOptions`): lm-eval `vllm` backend's model_args.
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (the model's own dtype; float32 on vLLM's CPU build), float32, bfloat16 or float16.")]
MaxModelLenOpt = Annotated[Optional[int], typer.Option("--max-model-len", help="Context length in tokens [default: the model's own, capped by the KV cache].")]
GpuMemoryOpt = Annotated[Optional[float], typer.Option("--gpu-memory-utilization", help="Share of GPU memory vLLM may use, in (0, 1] [default: vLLM's, 0.9].")]
TensorParallelOpt = Annotated[int, typer.Option("--tensor-parallel-size", help="GPUs the model is split over; above 1, layer-wise preemption and KV checkpoints are off.")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="A hub model's branch, tag or commit.")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own Python code (its config or modelling), as transformers does.")]
AddBosOpt = Annotated[bool, typer.Option("--add-bos-token", help="Begin every encoded text with the BOS token, as lm-eval's vllm backend with add_bos_token=True.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="vLLM's sampling seed (lm-eval vllm's model_args seed).")]
DeterministicOpt = Annotated[bool, typer.Option("--deterministic", help="Per-request results independent of what ran beside them: vLLM's batch-invariant mode on GPUs; on vLLM's CPU build, serve batches offline work apart from online traffic (docs/scoring.md).")]
# their names on a command, as `ModelOptions` fields
MODEL_OPTIONS = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size",
                 "revision", "trust_remote_code", "add_bos_token", "seed", "deterministic")


def store_for(db: str | None) -> Store:
    return Store(db or default_db_url())


def model_options(**values) -> ModelOptions:
    """`ModelOptions` from the model option flags (`MODEL_OPTIONS`); a bad value is a usage error."""
    return checked(ModelOptions, **values)


def checked(config_cls, **values):
    """A config dataclass from flags; its own checks become a usage error."""
    try:
        return config_cls(**values)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def on_off(flag: str, value: str | None) -> bool | None:
    if value is None:
        return None
    if value not in ("on", "off"):
        raise typer.BadParameter(f"{flag} takes on or off, not {value!r}")
    return value == "on"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM during a command. Not an Exception, so nothing on the way catches
    it as an error: a job keeps its progress, its in-flight items go back to pending and its
    run time counts (`jobs.lifecycle`). Not a KeyboardInterrupt either, which typer turns into
    a silent exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.job_id: str | None = None  # the job it stopped, if any


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM (a `kill`, a CI runner's timeout) raise `Interrupted` while a
    command runs; `serve` and `ci` install drains of their own meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
