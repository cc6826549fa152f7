"""The plain progress lines a CI log gets, and one line per phase."""

from __future__ import annotations

import io
import subprocess
import sys

from rich.console import Console

from conserve_bench.output import LineProgress, Output, Phases, describe_progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(buffer: io.StringIO) -> list[str]:
    return [line for line in buffer.getvalue().splitlines() if line]


def test_plain_progress_prints_a_line_every_interval_and_the_last_state():
    buffer, clock = io.StringIO(), Clock()
    with LineProgress(Console(file=buffer, width=200), every_s=10, clock=clock) as progress:
        task = progress.add_task("starting engine", total=None)
        clock.now = 40  # start-up: nothing to count yet, nothing printed
        progress.update(task, description="job a1", total=100, completed=0)
        for second in range(1, 26):
            clock.now = 40 + second
            progress.update(task, completed=4 * second)
    assert lines(buffer) == [
        "job a1: 40/100 (40%), 4.0 req/s, ETA 15s",
        "job a1: 80/100 (80%), 4.0 req/s, ETA 5s",
        "job a1: 100/100 (100%), 4.0 req/s",
    ]


def test_progress_line_formats():
    assert describe_progress("job", 0, None, 3.0) == "job"
    assert describe_progress("job", 30, 120, 10.0) == "job: 30/120 (25%), 3.0 req/s, ETA 30s"
    assert describe_progress("job", 10, 5000, 10.0).endswith("ETA 83m10s")
    assert (describe_progress("job", 30, 120, 10.0, tokens=5120)
            == "job: 30/120 (25%), 3.0 req/s, 5,120 tokens (512 tok/s), ETA 30s")


def test_phases_print_one_line_each_timed_back_to_back():
    buffer, clock = io.StringIO(), Clock()
    phases = Phases(Console(file=buffer, width=200), clock=clock)
    clock.now = 41.25
    assert phases.end("engine ready", "ctx 8192") == 41.25
    clock.now = 44.0
    phases.end("requests built")
    assert lines(buffer) == ["engine ready in 41.2s (ctx 8192)", "requests built in 2.8s"]
    silent = io.StringIO()
    quiet = Phases(Console(file=silent), enabled=False, clock=clock)
    clock.now = 50.0
    assert quiet.end("x") == 6.0 and silent.getvalue() == ""


CAPTURING_CLI = """
import os, sys
from pathlib import Path
from conserve_bench.output import out
out.capture(Path(sys.argv[1]))
print("library chatter")
os.write(2, b"engine process chatter\\n")
out.json({"ok": True})
out.error("error: one line")
"""


def test_capture_sends_everything_but_results_and_errors_to_the_log(tmp_path):
    log = tmp_path / "job.log"
    run = subprocess.run([sys.executable, "-c", CAPTURING_CLI, str(log)], capture_output=True,
                         text=True, check=True)
    assert run.stdout == '{"ok": true}\n' and run.stderr == "error: one line\n"
    assert log.read_text().splitlines() == ["library chatter", "engine process chatter"]


def test_capture_leaves_an_embedding_hosts_streams_alone(tmp_path, capsys):
    output = Output()
    output.capture(tmp_path / "job.log")  # pytest's capsys owns sys.stdout: not fd 1
    output.json({"ok": True})
    assert output.log_path is None and not (tmp_path / "job.log").exists()
    assert capsys.readouterr().out == '{"ok": true}\n'
