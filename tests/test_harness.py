"""The lm-eval backend `conserve` for real: lm-eval's CLI, Python, client mode, resume.

- `conserve-bench lm-eval` (lm-eval's own command line) SIGKILLed midway and run again:
  every committed request is reused from the store and the scores equal an uninterrupted run.
- `simple_evaluate(model=ConserveLM(...))` finishes its job and, run again, computes nothing.
- The local MMLU task YAML (`tasks/mmlu_local`) builds exactly lm-eval's `mmlu_*` requests;
  tests/test_engine.py compares it with lm-eval's `hf` backend.
- Client mode (`base_url=`) against a `conserve-bench serve` gives the embedded results.
The uninterrupted reference runs on the session engine; each subprocess starts its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conserve_bench.harness.lm import ConserveLM
from conserve_bench.jobs.lifecycle import task_metrics
from conserve_bench.store import Store
from conserve_bench.tasks import TASKS_DIR

from .conftest import TEST_TASKS

MMLU_TASKS = ["mmlu_local_anatomy", "mmlu_local_marketing"]
TINY_TASKS = [str(TEST_TASKS / "conserve_tiny_gen.yaml"), str(TEST_TASKS / "conserve_tiny_rolling.yaml")]
LIMIT = 8
NUM_GENERATE, NUM_ROLLING = min(LIMIT, 10), min(LIMIT, 4)  # documents of the tiny tasks
NUM_FEWSHOT = 5
MAX_INFLIGHT = 4


def lm_eval_tasks(data_dir):
    """The TaskManager lm-eval's CLI builds for `--include_path tasks/ --model_args data_dir=`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": data_dir})


def evaluate(lm, tasks, data_dir, num_fewshot=None):
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, limit=LIMIT, num_fewshot=num_fewshot,
                           task_manager=lm_eval_tasks(data_dir), log_samples=True)


def responses(output) -> dict[tuple[str, int], list]:
    """(task, doc id) -> the model's raw responses, one per request of the document."""
    return {(task, s["doc_id"]): [r[0] for r in s["resps"]]
            for task, samples in output["samples"].items() for s in samples}


def assert_same_responses(ours, theirs, tol=1e-4):
    assert ours.keys() == theirs.keys()
    for key in ours:
        for a, b in zip(ours[key], theirs[key]):
            if isinstance(a, str) or isinstance(b, str):
                assert a == b, (key, a, b)
            elif isinstance(a, (list, tuple)):
                assert abs(a[0] - b[0]) <= tol and bool(a[1]) == bool(b[1]), (key, a, b)
            else:
                assert abs(a - b) <= tol * max(1.0, abs(b)), (key, a, b)


# -- no engine ---------------------------------------------------------------------------------


def test_mmlu_local_yaml_builds_the_requests_of_lm_evals_mmlu(data_dir):
    """`mmlu_local_*` (our YAML over the CSVs) asks exactly what lm-eval's `mmlu_*` asks."""
    from conserve_bench.jobs.taskspec import task_manager

    def request_args(name, manager):
        task = manager.load([name])["tasks"][name]
        task.set_config(key="num_fewshot", value=2)
        task.build_all_requests(limit=5, rank=0, world_size=1)
        return [i.args for i in task.instances]

    ours = request_args("mmlu_local_anatomy", lm_eval_tasks(data_dir))
    assert len(ours) == 5 * 4
    assert ours == request_args("mmlu_anatomy", task_manager(data_dir))


def test_requests_job_api_validates_keys_by_content_and_pages_results(store):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from conserve_bench.serve.jobapi import install_job_api
    from conserve_bench.engine.prompts import item_key
    from conserve_bench.serve.server import ServeConfig

    app = FastAPI()
    install_job_api(app, store, ServeConfig(), "fp")
    http = TestClient(app)
    for bad in ({"requests": []}, {"requests": [{"kind": "loglikelihood", "args": ["only context"]}]},
                {"requests": [{"kind": "nope", "args": ["x"]}]},
                {"requests": [{"kind": "generate_until", "args": ["x", {}]}], "extra": 1}):
        assert http.post("/v1/jobs/requests", json=bad).status_code == 422, bad
    assert store.list_jobs() == []  # nothing written

    work = [{"kind": "loglikelihood", "args": ["Q:", " A"]}, {"kind": "loglikelihood_rolling", "args": ["t"]},
            {"kind": "loglikelihood", "args": ["Q:", " A"]}]
    job = http.post("/v1/jobs/requests", json={"requests": work}).json()
    keys = [item_key(w["kind"], w["args"], "fp") for w in work]
    assert job["keys"] == keys and (job["state"], job["done"], job["total"]) == ("queued", 0, 2)
    store.claim_items(job["id"], "me", 10)
    store.complete_items("me", {keys[0]: [-1.5, True], keys[1]: -7.0})
    page = http.get(f"/v1/jobs/{job['id']}/items", params={"limit": 1}).json()
    assert page == {"items": [{"key": keys[0], "kind": "loglikelihood", "state": "done",
                               "result": [-1.5, True]}], "next_offset": 1}

    again = http.post("/v1/jobs/requests", json={"requests": work}).json()
    assert again["id"] != job["id"] and (again["state"], again["done"], again["total"]) == ("done", 2, 2)


def test_register_keeps_lm_evals_own_backends():
    from lm_eval.api.registry import get_model

    from conserve_bench.harness import register

    register()
    assert get_model("conserve") is ConserveLM
    assert get_model("hf").__name__ == "HFLM"


# -- the session engine: the Python API ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference(engine, data_dir, tmp_path_factory):
    """An uninterrupted embedded run (fresh store): MMLU 5-shot, and generation + rolling."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'ref.db'}"
    with ConserveLM(db=url, engine=engine, data_dir=data_dir, max_inflight=16) as lm:
        mmlu = evaluate(lm, MMLU_TASKS, data_dir, NUM_FEWSHOT)
        tiny = evaluate(lm, TINY_TASKS, data_dir)
    return {"url": url, "job_id": lm.job_id, "mmlu": mmlu, "tiny": tiny}


@pytest.mark.engine
def test_simple_evaluate_with_conserve_lm_finishes_its_job_and_reruns_from_the_store(
        reference, engine, data_dir, capsys):
    store = Store(reference["url"])
    job = store.get_job(reference["job_id"])
    num_mmlu = len(MMLU_TASKS) * LIMIT * 4
    assert (job.state, job.num_done, job.num_total) == ("done", job.num_total, num_mmlu + NUM_GENERATE + NUM_ROLLING)
    assert set(task_metrics(reference["mmlu"])) == set(MMLU_TASKS)

    capsys.readouterr()
    with ConserveLM(db=reference["url"], engine=engine, progress=False) as lm:
        again = evaluate(lm, MMLU_TASKS, data_dir, NUM_FEWSHOT)
    assert f"loglikelihood: {num_mmlu} requests, {num_mmlu} reused from the store, 0 computed" \
        in capsys.readouterr().err
    assert task_metrics(again) == task_metrics(reference["mmlu"])
    assert store.get_job(lm.job_id).state == "done"


# -- subprocesses with their own engine --------------------------------------------------------


def lm_eval_cli(url, data_dir, out_dir):
    model_args = f"model=smollm2-135m,db={url},data_dir={data_dir},max_inflight={MAX_INFLIGHT}"
    return [sys.executable, "-m", "conserve_bench.cli", "lm-eval", "--model", "conserve",
            "--model_args", model_args, "--tasks", ",".join(MMLU_TASKS), "--limit", str(LIMIT),
            "--num_fewshot", str(NUM_FEWSHOT), "--output_path", str(out_dir)]


def wait_for_progress(store: Store, proc, timeout_s=600) -> str:
    """The job id once some but not all of its items are committed."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        found = store.list_jobs()
        if found and 0 < found[0].num_done < found[0].num_total:
            return found[0].id
        time.sleep(0.02)
    raise AssertionError("lm-eval never got part way")


def lm_eval_output(out_dir: Path) -> dict:
    (path,) = out_dir.glob("**/results_*.json")
    return json.loads(path.read_text())


@pytest.mark.engine
@pytest.mark.slow
def test_lm_eval_cli_sigkilled_then_rerun_reuses_finished_requests(reference, data_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store(url)
    first = subprocess.Popen(lm_eval_cli(url, data_dir, tmp_path / "killed"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        killed_id = wait_for_progress(store, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # lm-eval and vLLM's engine processes
        first.wait()
    done_at_kill = {i["key"] for i in store.job_items(killed_id) if i["state"] == "done"}
    num_total = len(store.job_items(killed_id))
    assert 0 < len(done_at_kill) < num_total

    second = subprocess.run(lm_eval_cli(url, data_dir, tmp_path / "rerun"), capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("conserve: loglikelihood")]
    num_reused = int(line.split(", ")[1].split()[0])
    assert len(done_at_kill) <= num_reused < num_total, line
    runs = store.run_counts(killed_id)
    assert all(runs[key] == 1 for key in done_at_kill)  # finished items never ran again
    assert sum(n - 1 for n in runs.values()) <= MAX_INFLIGHT  # only the lost window did
    rerun = store.list_jobs()[0]
    assert rerun.id != killed_id and rerun.state == "done" and rerun.num_done == num_total

    expected = task_metrics(reference["mmlu"])
    got = task_metrics(lm_eval_output(tmp_path / "rerun"))
    assert {t: got[t]["acc,none"] for t in MMLU_TASKS} == {t: expected[t]["acc,none"] for t in MMLU_TASKS}
    stored = {i["key"]: [i["result"]] for i in store.job_items(rerun.id)}
    uninterrupted = {i["key"]: [i["result"]]
                     for i in Store(reference["url"]).job_items(reference["job_id"])}
    assert_same_responses(stored, {key: uninterrupted[key] for key in stored})


@pytest.mark.engine
@pytest.mark.slow
def test_client_mode_against_serve_matches_embedded_and_is_idempotent(reference, data_dir, tmp_path, capsys):
    from .test_server import KEY, Server

    server = Server(f"sqlite:///{tmp_path / 'server.db'}", data_dir, tmp_path)
    try:
        lm = ConserveLM(base_url=server.url, api_key=KEY)
        mmlu = evaluate(lm, MMLU_TASKS, data_dir, NUM_FEWSHOT)
        tiny = evaluate(lm, TINY_TASKS, data_dir)
        capsys.readouterr()
        again = evaluate(lm, TINY_TASKS, data_dir)
        reused = f"generate_until: {NUM_GENERATE} requests, {NUM_GENERATE} reused from the store, 0 computed"
        assert reused in capsys.readouterr().err
        bad = server.http.post("/v1/jobs/requests", json={"requests": [{"kind": "loglikelihood", "args": ["x"]}]})
        assert bad.status_code == 422 and "loglikelihood arguments" in bad.text
    finally:
        server.stop()
    assert task_metrics(mmlu) == task_metrics(reference["mmlu"])
    assert_same_responses(responses(mmlu), responses(reference["mmlu"]))
    assert_same_responses(responses(tiny), responses(reference["tiny"]))
    assert_same_responses(responses(again), responses(tiny), tol=0.0)
