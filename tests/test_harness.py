"""The lm-eval backend `conserve`: lm-eval's CLI, Python, client mode, resume after a kill.

- `conserve-bench lm-eval` (lm-eval's own command line) runs `--model conserve` and scores
  like `simple_evaluate(model=ConserveLM(...))`, which, run again, computes nothing.
- An embedded run SIGKILLed midway and run again reuses every committed request and scores
  like an uninterrupted run (on the fake engine: the store and runner are what is tested;
  tests/test_durability.py kills the real engine).
- The local MMLU task YAML (`tasks/mmlu_local`) builds exactly lm-eval's `mmlu_*` requests;
  tests/test_engine.py compares it with lm-eval's `hf` backend.
- Client mode (`base_url=`) against the session's `conserve-bench serve` gives the embedded
  results. The uninterrupted reference runs on the session engine.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conserve_bench.errors import ModelArgsError
from conserve_bench.harness.lm import ConserveLM
from conserve_bench.jobs.lifecycle import task_metrics
from conserve_bench.store import Store
from conserve_bench.tasks import TASKS_DIR

from .conftest import KEY, TEST_TASKS, wait_for

MMLU_TASKS = ["mmlu_local_anatomy", "mmlu_local_marketing"]
TINY_TASKS = [str(TEST_TASKS / "conserve_tiny_gen.yaml"), str(TEST_TASKS / "conserve_tiny_rolling.yaml")]
LIMIT = 8
NUM_GENERATE, NUM_ROLLING = min(LIMIT, 10), min(LIMIT, 4)  # documents of the tiny tasks
NUM_FEWSHOT = 5


@functools.cache
def lm_eval_tasks(data_dir):
    """The TaskManager lm-eval's CLI builds for `--include_path tasks/ --model_args data_dir=`
    (built once: indexing lm-eval's tasks takes seconds)."""
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
    from conserve_bench.store import item_key
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
                               "result": [-1.5, True], "num_resumes": 0}], "next_offset": 1}

    again = http.post("/v1/jobs/requests", json={"requests": work}).json()
    assert again["id"] != job["id"] and (again["state"], again["done"], again["total"]) == ("done", 2, 2)


def test_unknown_model_args_are_refused_in_one_line():
    """lm-eval's generic options pass; a typo does not vanish silently (create_from_arg_string)."""
    with pytest.raises(ModelArgsError) as e:
        ConserveLM.create_from_arg_string("base_url=http://127.0.0.1:1,max_inflght=4",
                                          {"batch_size": 1, "max_batch_size": None, "device": None})
    assert "'max_inflght' (did you mean 'max_inflight'?)" in str(e.value) and "\n" not in str(e.value)
    lm = ConserveLM.create_from_arg_string("base_url=http://127.0.0.1:1", {"batch_size": 8, "device": "cpu"})
    assert lm.job_id is None  # client mode: nothing started


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


# -- lm-eval's command line, in this process on the session engine ------------------------------


def lm_eval_args(url, data_dir, out_dir):
    model_args = f"model=smollm2-135m,db={url},data_dir={data_dir},max_inflight=4"
    return ["--model", "conserve", "--model_args", model_args, "--tasks", ",".join(MMLU_TASKS),
            "--limit", str(LIMIT), "--num_fewshot", str(NUM_FEWSHOT), "--output_path", str(out_dir)]


def lm_eval_output(out_dir: Path) -> dict:
    (path,) = out_dir.glob("**/results_*.json")
    return json.loads(path.read_text())


@pytest.mark.engine
def test_lm_eval_cli_runs_the_conserve_backend(reference, session_engine_for_entry_points, data_dir,
                                               tmp_path, monkeypatch, capsys):
    """`conserve-bench lm-eval ...` as a user types it (the engine is the session's)."""
    from types import SimpleNamespace

    from conserve_bench.harness import lm as harness_lm
    from conserve_bench.harness import run_lm_eval

    closers = []  # ConserveLM closes at exit; here, at the end of the test
    monkeypatch.setattr(harness_lm, "atexit", SimpleNamespace(register=closers.append))
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    run_lm_eval(lm_eval_args(url, data_dir, tmp_path / "out"))
    for close in closers:
        close()
    num_mmlu = len(MMLU_TASKS) * LIMIT * 4
    assert f"loglikelihood: {num_mmlu} requests, 0 reused from the store, {num_mmlu} computed" \
        in capsys.readouterr().err
    (job,) = Store(url).list_jobs()
    assert (job.state, job.num_done, job.num_total) == ("done", num_mmlu, num_mmlu)
    got, expected = task_metrics(lm_eval_output(tmp_path / "out")), task_metrics(reference["mmlu"])
    assert {t: got[t]["acc,none"] for t in MMLU_TASKS} == {t: expected[t]["acc,none"] for t in MMLU_TASKS}


# -- an embedded run SIGKILLed, then run again (fake engine: the store and runner at work) ------

KILLED_RUN = """
import sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.harness.lm import ConserveLM
url, stall_after, limit, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lm = ConserveLM(db=url, engine=FakeEngine(stall_after=stall_after), max_inflight=4, progress=False)
simple_evaluate(model=lm, tasks=["conserve_tiny_gen", "conserve_tiny_rolling"], limit=limit,
                task_manager=TaskManager(include_path=folder, include_defaults=False))
"""


def fake_evaluate(url):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from conserve_bench.engine.fake import FakeEngine

    tasks = TaskManager(include_path=str(TEST_TASKS), include_defaults=False)
    with ConserveLM(db=url, engine=FakeEngine(), max_inflight=4, progress=False) as lm:
        output = simple_evaluate(model=lm, tasks=["conserve_tiny_gen", "conserve_tiny_rolling"],
                                 limit=LIMIT, task_manager=tasks, log_samples=True)
    return output, lm.job_id


def reuse_counts(stderr: str) -> dict[str, tuple[int, int]]:
    """kind -> (requests, reused), from the lines `conserve: KIND: N requests, M reused ...`."""
    counts = {}
    for line in stderr.splitlines():
        if line.startswith("conserve: "):
            kind, requests, reused = line.split(": ")[1], *line.split(": ")[2].split(", ")[:2]
            counts[kind] = (int(requests.split()[0]), int(reused.split()[0]))
    return counts


def test_an_embedded_run_sigkilled_then_rerun_reuses_every_committed_request(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    store, num_done_at_kill = Store(url), 6
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, url, str(num_done_at_kill),
                               str(LIMIT), str(TEST_TASKS)], stderr=subprocess.PIPE, text=True)
    try:
        def stalled():
            assert killed.poll() is None, killed.stderr.read()
            jobs = store.list_jobs()
            return jobs[0] if jobs and jobs[0].num_done == num_done_at_kill else None

        killed_job = wait_for(stalled, "the stall", timeout_s=300)
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    done_at_kill = {i["key"] for i in store.job_items(killed_job.id) if i["state"] == "done"}
    assert len(done_at_kill) == num_done_at_kill and killed_job.state == "running"
    assert store.item_states(killed_job.id)["running"] > 0  # claimed by the dead process

    capsys.readouterr()
    rerun, rerun_id = fake_evaluate(url)
    counts = reuse_counts(capsys.readouterr().err)
    assert {kind: n for kind, (n, _) in counts.items()} == {
        "generate_until": NUM_GENERATE, "loglikelihood_rolling": NUM_ROLLING}
    assert sum(reused for _, reused in counts.values()) == num_done_at_kill
    runs = store.run_counts(rerun_id)
    assert all(runs[key] == 1 for key in done_at_kill)  # finished items never ran again
    assert sum(n - 1 for n in runs.values()) <= 4  # only the lost window did
    assert store.get_job(rerun_id).state == "done" and store.get_job(killed_job.id).state == "running"
    uninterrupted, _ = fake_evaluate(f"sqlite:///{tmp_path / 'clean.db'}")
    assert task_metrics(rerun) == task_metrics(uninterrupted)
    assert_same_responses(responses(rerun), responses(uninterrupted), tol=0.0)


# -- client mode, on the session's server ------------------------------------------------------


@pytest.mark.engine
@pytest.mark.slow
def test_client_mode_against_serve_matches_embedded_and_is_idempotent(reference, server, data_dir, capsys):
    lm = ConserveLM(base_url=server.url, api_key=KEY)
    mmlu = evaluate(lm, MMLU_TASKS, data_dir, NUM_FEWSHOT)
    tiny = evaluate(lm, TINY_TASKS, data_dir)
    capsys.readouterr()
    again = evaluate(lm, TINY_TASKS, data_dir)
    reused = f"generate_until: {NUM_GENERATE} requests, {NUM_GENERATE} reused from the store, 0 computed"
    assert reused in capsys.readouterr().err
    bad = server.http.post("/v1/jobs/requests", json={"requests": [{"kind": "loglikelihood", "args": ["x"]}]})
    assert bad.status_code == 422 and "loglikelihood arguments" in bad.text
    assert task_metrics(mmlu) == task_metrics(reference["mmlu"])
    assert_same_responses(responses(mmlu), responses(reference["mmlu"]))
    assert_same_responses(responses(tiny), responses(reference["tiny"]))
    assert_same_responses(responses(again), responses(tiny), tol=0.0)


@pytest.fixture
def submit_vs_hf():
    from benchmarks import submit_vs_hf

    return submit_vs_hf


def test_submit_vs_hf_pairs_each_request_with_lm_evals_cache_entry(tmp_path, submit_vs_hf):
    """benchmarks/submit_vs_hf.py finds hf's answer to each of conserve's requests under the
    key lm-eval's request cache writes it with (`CacheHook`), and reports the differences."""
    from types import SimpleNamespace

    from lm_eval.api.model import CacheHook
    from sqlitedict import SqliteDict

    from conserve_bench.config import JobSpec
    from conserve_bench.store import WorkItem

    benchmark = submit_vs_hf
    url = f"sqlite:///{tmp_path / 'conserve.db'}"
    store = Store(url)
    job = store.create_job(JobSpec(tasks=("mmlu",)))
    ours = {("Q1", " A"): [-1.0, True], ("Q1", " B"): [-1.25, False],
            ("Q2", " A"): [-2.0, False], ("Q2", " B"): [-2.00001, True], ("Q3", " A"): [-3.0, True]}
    store.add_items(job.id, [WorkItem(f"k{i}", "loglikelihood", list(args)) for i, args in enumerate(ours)])
    store.complete_items("me", {w.key: ours[tuple(w.args)] for w in store.claim_items(job.id, "me", 10)})
    theirs = {("Q1", " A"): (-1.00002, True), ("Q1", " B"): (-1.25, True),  # is_greedy differs
              ("Q2", " A"): (-2.0, False), ("Q2", " B"): (-2.00001, True)}  # Q3: not answered yet
    with SqliteDict(str(tmp_path / "hf-cache_rank0.db"), autocommit=True) as cache:
        hook = CacheHook(SimpleNamespace(dbdict=cache))
        for args, result in theirs.items():
            hook.add_partial("loglikelihood", args, result)

    found = benchmark.compare_requests(url, tmp_path / "hf-cache_rank0.db")
    assert found["num_compared"] == 4 and found["num_is_greedy_differ"] == 1
    assert found["max_abs_diff"] == pytest.approx(2e-5, abs=1e-9)
    assert found["num_near_ties"] == 1  # Q2: its two choices 1e-5 apart


def test_full_mmlu_shards_split_every_subject_and_keep_the_few_shot_examples(tmp_path, submit_vs_hf):
    """The shards of benchmarks/submit_vs_hf.py hold, between them, each test question once
    and in order, read back exactly (quotes, commas, newlines), beside the unchanged dev split."""
    import csv

    from conserve_bench.jobs.taskspec import load_mmlu_csv

    full = tmp_path / "mmlu"
    for split in ("dev", "val", "test"):
        (full / split).mkdir(parents=True)
        with open(full / split / f"anatomy_{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([f'{split} "{i}", has a comma\nand a line', "a", "b", "c", "d", "ABCD"[i % 4]]
                                    for i in range(7))
    shards = [load_mmlu_csv(submit_vs_hf.write_shard(full, tmp_path / f"s{k}", k, 3), "anatomy")
              for k in range(3)]
    whole = load_mmlu_csv(str(full), "anatomy")
    assert [shard["test"].num_rows for shard in shards] == [3, 2, 2]
    assert [shards[i % 3]["test"][i // 3] for i in range(7)] == list(whole["test"])
    assert all(list(shard["dev"]) == list(whole["dev"]) for shard in shards)


def test_full_mmlu_shards_combine_into_one_run(submit_vs_hf):
    """Combined shards: times and items summed, each subject's accuracy from its questions
    answered right in every shard, the group's weighted by size, as lm-eval's MMLU does."""
    def arm(acc, n, total_s, eval_s):
        return {"batch_size": 4, "acc": acc | {"mmlu": 0.0}, "n": n, "total_s": total_s,
                "eval_s": eval_s, "num_items": 4 * sum(n.values())}

    requests = {"num_compared": 8, "max_abs_diff": 1e-5, "median_abs_diff": 1e-6,
                "num_is_greedy_differ": 1, "num_near_ties": 0}
    shards = [{"conserve": arm({"anatomy": 0.5, "law": 1 / 3}, {"anatomy": 2, "law": 3}, 10.0, 8.0),
               "hf": arm({"anatomy": 0.5, "law": 1 / 3}, {"anatomy": 2, "law": 3}, 30.0, 24.0),
               "requests": requests},
              {"conserve": arm({"anatomy": 1.0, "law": 0.0}, {"anatomy": 1, "law": 2}, 5.0, 4.0),
               "hf": arm({"anatomy": 0.0, "law": 0.0}, {"anatomy": 1, "law": 2}, 15.0, 12.0),
               "requests": requests | {"max_abs_diff": 3e-5, "num_near_ties": 2}}]

    run = submit_vs_hf.combine(shards)
    assert run["conserve"]["acc"] == {"anatomy": 2 / 3, "law": 1 / 5, "mmlu": 3 / 8}
    assert run["hf"]["acc"] == {"anatomy": 1 / 3, "law": 1 / 5, "mmlu": 2 / 8}
    assert (run["conserve"]["total_s"], run["conserve"]["eval_s"], run["conserve"]["num_items"]) == (15.0, 12.0, 32)
    assert run["compare"]["end_to_end_x"] == 3.0 and run["compare"]["differing"] == ["anatomy", "mmlu"]
    assert run["requests"] == {"num_compared": 16, "max_abs_diff": 3e-5, "median_abs_diff": 1e-6,
                               "num_is_greedy_differ": 2, "num_near_ties": 2}


def test_full_mmlu_shards_of_another_few_shot_count_are_refused(tmp_path, monkeypatch, submit_vs_hf):
    """Shards kept from a 0-shot run are neither combined with 5-shot ones nor continued by a
    5-shot run: one line names the file and what to do, before any shard runs."""
    for shard, num_fewshot in enumerate((5, 0)):
        (tmp_path / f"shard-{shard:02d}-of-04.json").write_text(json.dumps({"num_fewshot": num_fewshot}))
    refused = r"shard-01-of-04.json was run 0-shot, not 5-shot: give --num-fewshot 0 or another --shards-dir"
    with pytest.raises(SystemExit, match=refused):
        submit_vs_hf.load_shards(tmp_path, 4, 5)

    def never(*_):
        raise AssertionError("started a run")

    for name in ("run_missing_shards", "host_profile", "run_hf", "run_conserve"):
        monkeypatch.setattr(submit_vs_hf, name, never)
    monkeypatch.setattr("sys.argv", ["submit_vs_hf.py", "--limits", "0", "--hf-batch-sizes", "4",
                                     "--shards", "4", "--shards-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=refused):
        submit_vs_hf.main()
    (tmp_path / "shard-01-of-04.json").unlink()
    assert submit_vs_hf.load_shards(tmp_path, 4, 5) == [{"num_fewshot": 5}]
    monkeypatch.setattr("sys.argv", ["submit_vs_hf.py", "--limits", "0", "--hf-batch-sizes", "4",
                                     "--shards", "0", "--shards-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as usage:
        submit_vs_hf.main()
    assert usage.value.code == 2  # argparse's usage error, not a run of the limits mode


def test_full_mmlu_run_continues_with_the_missing_shards_only(tmp_path, monkeypatch, submit_vs_hf):
    """A rerun runs the shards not yet kept, each on its own questions, both arms on the same
    folder, the host profiled once; each report is kept as it is finished, with its few-shot
    count."""
    import csv
    from types import SimpleNamespace

    full = tmp_path / "mmlu"
    for split in ("dev", "val", "test"):
        (full / split).mkdir(parents=True)
        with open(full / split / f"anatomy_{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([f"{split} {i}", "a", "b", "c", "d", "A"] for i in range(5))
    shards_dir = tmp_path / "shards"
    shards_dir.mkdir()
    kept = {"label": "shard 2/3", "num_fewshot": 5, "kept": True}
    (shards_dir / "shard-01-of-03.json").write_text(json.dumps(kept))

    ran, profiled = [], []

    def arm(name):
        def run(args, limit, *rest, use_cache=False):
            data_dir = rest[-2]
            with open(Path(data_dir) / "test" / "anatomy_test.csv", newline="", encoding="utf-8") as f:
                questions = [row[0] for row in csv.reader(f)]
            ran.append((name, limit, data_dir, questions))
            assert (Path(data_dir) / "dev" / "anatomy_dev.csv").exists()
            return {"batch_size": rest[0] if name == "hf" else None, "total_s": 1.0, "eval_s": 1.0,
                    "num_items": 4 * len(questions), "acc": {"mmlu": 0.25}, "n": {"anatomy": len(questions)}}
        return run

    monkeypatch.setattr(submit_vs_hf, "run_conserve", arm("conserve"))
    monkeypatch.setattr(submit_vs_hf, "run_hf", arm("hf"))
    monkeypatch.setattr(submit_vs_hf, "host_profile", lambda: profiled.append(1) or {"fixed_ms": 1.0})
    monkeypatch.setattr(submit_vs_hf, "compare_requests", lambda db, cache: {"num_compared": 0})
    monkeypatch.setattr(submit_vs_hf.signal, "signal", lambda *_: None)  # not pytest's own SIGTERM
    args = SimpleNamespace(shards=3, num_fewshot=5, data_dir=str(full), no_profile=False)
    submit_vs_hf.run_missing_shards(args, 4, shards_dir)

    assert [(name, limit, questions) for name, limit, _, questions in ran] == [
        ("conserve", 0, ["test 0", "test 3"]), ("hf", 0, ["test 0", "test 3"]),
        ("conserve", 0, ["test 2"]), ("hf", 0, ["test 2"])]
    assert ran[0][2] == ran[1][2] and ran[2][2] == ran[3][2]  # both arms, one folder
    assert profiled == [1]
    reports = {p.name: json.loads(p.read_text()) for p in shards_dir.iterdir()}
    assert sorted(reports) == ["shard-00-of-03.json", "shard-01-of-03.json", "shard-02-of-03.json"]
    assert reports["shard-01-of-03.json"] == kept  # not run again
    for name, label in (("shard-00-of-03.json", "shard 1/3"), ("shard-02-of-03.json", "shard 3/3")):
        report = reports[name]
        assert (report["label"], report["num_fewshot"], report["host"]) == (label, 5, {"fixed_ms": 1.0})
        assert report["compare"]["same_items"] and report["requests"] == {"num_compared": 0}


def test_client_mode_posts_fit_under_the_servers_body_limit():
    """lm-eval's requests go to a server in posts the guard's one body limit admits: runs of
    at most 1000 requests and MAX_POST_BYTES of JSON, in order, none left out."""
    import json

    from conserve_bench.serve.guard import DEFAULT_MAX_REQUEST_BYTES
    from harness.backends import MAX_POST_BYTES, post_sized

    requests = [{"kind": "loglikelihood", "args": ["x" * 12_000, f" {i}"]} for i in range(300)]
    posts = list(post_sized(requests))
    assert [r for post in posts for r in post] == requests
    assert len(posts) > 1 and all(len(json.dumps({"requests": p})) <= MAX_POST_BYTES for p in posts)
    assert MAX_POST_BYTES < DEFAULT_MAX_REQUEST_BYTES
    small = [{"kind": "loglikelihood", "args": ["q", " a"]}] * 2500
    assert [len(p) for p in post_sized(small)] == [1000, 1000, 500]
