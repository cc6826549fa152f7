"""What a person sees: results on stdout, progress and one-line messages on stderr, and every
library's chatter (vLLM, lm-eval, torch, the engine's own processes) in a log file instead.

`Output.capture(log_path)` moves file descriptors 1 and 2 to the log, so that engine
subprocesses inherit it too, and keeps the terminal for this module's consoles. With
`--verbose` nothing is captured. When stderr is not a terminal (a CI log), progress is a plain
line every few seconds instead of a live bar. Nothing here decides what a job does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

from conserve_bench.errors import OutputDirError

PLAIN_PROGRESS_EVERY_S = 10.0
LOG_WIDTH = 160  # NOTE: tables printed to a file (a CI log) get no 80-column cut


class Output:
    """The process's two consoles; `capture` reroutes everything else to a log file."""

    def __init__(self):
        # NOTE: no file given: rich writes to whatever sys.stdout/sys.stderr are at the time
        self.stdout = Console(width=None if sys.stdout.isatty() else LOG_WIDTH)
        self.stderr = Console(stderr=True, width=None if sys.stderr.isatty() else LOG_WIDTH)
        self._terminal_out: IO[str] | None = None
        self.log_path: Path | None = None

    def capture(self, log_path: Path) -> None:
        """From now on, whatever is written to fd 1 or 2 by anyone else goes to `log_path`."""
        if self.log_path is not None or not _is_fd(sys.stdout, 1) or not _is_fd(sys.stderr, 2):
            return  # NOTE: embedded (pytest, a notebook): the host owns the streams; leave them
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise OutputDirError(f"cannot write the log {log_path}: {e.strerror or e}") from None
        sys.stdout.flush()
        sys.stderr.flush()
        terminal_out = os.fdopen(os.dup(1), "w", buffering=1)
        terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        # NOTE: lm-eval's per-task bars would fill the log; our own progress replaces them.
        os.environ["TQDM_DISABLE"] = "1"
        self.stdout = _console(terminal_out)
        self.stderr = _console(terminal_err)
        self._terminal_out = terminal_out
        self.log_path = log_path

    def json(self, obj: dict[str, Any]) -> None:
        self.write(json.dumps(obj, default=str) + "\n")

    def write(self, text: str) -> None:
        """Text on the terminal's stdout as it is (no markup, no wrapping)."""
        file = self._terminal_out or sys.stdout
        file.write(text)
        file.flush()

    def error(self, message: str) -> None:
        """One line on the terminal's stderr, whatever is captured; never wrapped."""
        file = self.stderr.file
        file.write(message.rstrip("\n") + "\n")
        file.flush()

    def progress(self, disable: bool = False) -> Progress | LineProgress:
        """A live bar on a terminal; a plain line every few seconds in a log."""
        if disable or self.stderr.is_terminal:
            return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            _RateColumn(), _TokensColumn(), TimeRemainingColumn(),
                            console=self.stderr, disable=disable, transient=False)
        return LineProgress(self.stderr)


class Phases:
    """One line per phase as it ends (`engine ready in 41.2s (...)`), timed back to back."""

    def __init__(self, console: Console, enabled: bool = True, clock=time.perf_counter):
        self.console, self.enabled, self.clock = console, enabled, clock
        self._since = clock()

    def end(self, what: str, detail: str = "") -> float:
        now = self.clock()
        seconds, self._since = now - self._since, now
        if self.enabled:
            suffix = f" ({detail})" if detail else ""
            self.console.print(f"{what} in {seconds:.1f}s{suffix}", highlight=False, soft_wrap=True)
        return seconds


def _is_fd(stream: IO[str], fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def _console(file: IO[str]) -> Console:
    return Console(file=file) if file.isatty() else Console(file=file, width=LOG_WIDTH)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} req/s" if task.speed else "-- req/s", style="cyan")


class _TokensColumn(ProgressColumn):
    """Tokens generated so far (the `tokens` field), and their rate; empty before the first."""

    def render(self, task) -> Text:
        return Text(describe_tokens(task.fields.get("tokens", 0), task.elapsed or 0.0))


class LineProgress:
    """The part of rich's `Progress` the CLI uses, printed as plain lines: at most one every
    `every_s` per task, plus its last state when the task or the display ends."""

    def __init__(self, console: Console, every_s: float = PLAIN_PROGRESS_EVERY_S,
                 clock=time.monotonic):
        self.console, self.every_s, self.clock = console, every_s, clock
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task_id in self._tasks:
            self._print(task_id, force=True)

    def add_task(self, description: str, total: float | None = None, **_fields) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {"description": description, "total": None, "completed": 0,
                                "tokens": 0, "started": None, "printed": None, "last_line": None}
        self.update(task_id, total=total)
        return task_id

    def update(self, task_id: int, *, description: str | None = None, completed=None,
               total=None, tokens=None, **_fields) -> None:
        task = self._tasks[task_id]
        for name, value in (("description", description), ("completed", completed),
                            ("total", total), ("tokens", tokens)):
            if value is not None:
                task[name] = value
        if task["total"] and task["started"] is None:
            # NOTE: the rate counts from when there is something to count, not from start-up
            task["started"] = task["printed"] = self.clock()
        self._print(task_id, force=False)

    def _print(self, task_id: int, force: bool) -> None:
        task, now = self._tasks[task_id], self.clock()
        if task["started"] is None or (not force and now - task["printed"] < self.every_s):
            return
        line = describe_progress(task["description"], task["completed"], task["total"],
                                 now - task["started"], task["tokens"])
        if line != task["last_line"]:
            self.console.print(line, highlight=False, soft_wrap=True)
            task["printed"], task["last_line"] = now, line


def describe_progress(description: str, completed: float, total: float | None,
                      elapsed_s: float, tokens: int = 0) -> str:
    """`job 3f2a: 120/456 (26%), 3.1 req/s, 5,120 tokens (41 tok/s), ETA 1m48s` (what a plain
    progress line says; the tokens only once some were generated)."""
    if not total:
        return description
    rate = completed / elapsed_s if elapsed_s > 0 else 0.0
    eta = f", ETA {format_duration((total - completed) / rate)}" if rate > 0 and completed < total else ""
    generated = f", {describe_tokens(tokens, elapsed_s)}" if tokens else ""
    return (f"{description}: {int(completed)}/{int(total)} ({completed / total:.0%}), "
            f"{rate:.1f} req/s{generated}{eta}")


def describe_tokens(tokens: int, elapsed_s: float) -> str:
    """`5,120 tokens (41 tok/s)`; empty for none."""
    if not tokens:
        return ""
    return f"{tokens:,} tokens" + (f" ({tokens / elapsed_s:.0f} tok/s)" if elapsed_s > 0 else "")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


out = Output()
