"""A job's output is lm-eval's: the files its CLI writes (`<output>/<model>/results_<date>.json`,
`samples_<task>_<date>.jsonl` with --log-samples), found and read by lm-eval's own readers,
holding every key lm-eval's `EvaluationTracker` writes; `<job-id>.json` beside them, and
`results --json` and the job API print that same object. Fake engine, lm-eval's real tasks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conserve_bench.config import JobSpec
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.jobs.lifecycle import (job_results, read_results_file, run_job, submit_job,
                                           write_results_file)
from conserve_bench.jobs.results import lm_eval_results

from .conftest import TEST_TASKS

TASKS = ("conserve_tiny_gen", "conserve_tiny_rolling")
TASK_FILES = tuple(str(TEST_TASKS / f"{task}.yaml") for task in TASKS)
TOKENIZER = SimpleNamespace(pad_token=None, pad_token_id=None, eos_token="</s>", eos_token_id=2,
                            bos_token="<s>", bos_token_id=1)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


def engine_with_tokenizer() -> FakeEngine:
    engine = FakeEngine()
    engine.encoder = SimpleNamespace(tokenizer=TOKENIZER)  # as the vLLM engines hold one
    engine.max_model_len = 2048
    return engine


@pytest.fixture(scope="module")
def lm_eval_output(tmp_path_factory) -> Path:
    """What lm-eval's CLI writes with `--output_path OUT --log_samples` for the same tasks, on
    a fake LM holding a tokenizer (as `hf` and `vllm` do): its own EvaluationTracker."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.loggers import EvaluationTracker

    from conserve_bench.jobs.taskspec import task_manager

    class FakeLM(LM):
        tokenizer, eot_token_id, max_length = TOKENIZER, 2, 2048

        def loglikelihood(self, requests):
            return [(-1.0, True) for _ in requests]

        def loglikelihood_rolling(self, requests):
            return [-10.0 for _ in requests]

        def generate_until(self, requests):
            return [" Paris" for _ in requests]

    folder = tmp_path_factory.mktemp("lm-eval")
    tracker = EvaluationTracker(output_path=str(folder))
    results = simple_evaluate(model=FakeLM(), model_args="pretrained=fake/model", tasks=list(TASK_FILES),
                              task_manager=task_manager(None), log_samples=True,
                              evaluation_tracker=tracker)
    samples = results.pop("samples")  # NOTE: as lm_eval/_cli/run.py does, step by step
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return folder


def test_our_files_are_where_lm_eval_writes_them_and_its_readers_read_them(store, tmp_path, lm_eval_output):
    from lm_eval.utils import (get_file_datetime, get_file_task_name, get_latest_filename,
                               get_results_filenames, get_sample_results_filenames,
                               sanitize_model_name)

    tmp_path = tmp_path / "results"
    job = submit_job(store, JobSpec(tasks=TASK_FILES))
    results = run_job(store, job.id, engine_with_tokenizer(), output_dir=tmp_path, log_samples=True)
    files = files_in(tmp_path)
    (results_path,) = get_results_filenames(files)
    assert get_latest_filename(get_results_filenames(files)) == results_path
    assert Path(results_path).parent == tmp_path / sanitize_model_name(job.spec.model)
    sample_files = get_sample_results_filenames(files)
    assert sorted(get_file_task_name(Path(f).name) for f in sample_files) == sorted(TASKS)
    date = get_file_datetime(Path(results_path).name).removesuffix(".json")
    assert {get_file_datetime(Path(f).name) for f in sample_files} == {date}  # one run, one date
    assert sorted(files) == sorted([results_path, *sample_files, str(tmp_path / f"{job.id}.json"),
                                    str(tmp_path / f"{job.id}.samples.jsonl")])

    # ... and hold what lm-eval's own tracker writes: every key of its results and samples
    ours = json.loads(Path(results_path).read_text())
    (theirs_path,) = get_results_filenames(files_in(lm_eval_output))
    theirs = json.loads(Path(theirs_path).read_text())
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    assert set(theirs["config"]) <= set(ours["config"]), set(theirs["config"]) - set(ours["config"])
    assert (ours["config"]["model"], ours["config"]["model_args"]["pretrained"]) == ("vllm", job.spec.model)
    assert (ours["model_source"], ours["model_name"]) == ("vllm", job.spec.model)
    assert ours["task_hashes"] == theirs["task_hashes"]  # the same documents, prompts, targets
    assert ours["conserve"]["job"]["id"] == job.id and ours == lm_eval_results(results)
    for task in TASKS:
        [our_lines] = [f for f in sample_files if get_file_task_name(Path(f).name) == task]
        [their_lines] = [f for f in get_sample_results_filenames(files_in(lm_eval_output))
                         if get_file_task_name(Path(f).name) == task]
        our_rows = [json.loads(line) for line in Path(our_lines).read_text().splitlines()]
        their_rows = [json.loads(line) for line in Path(their_lines).read_text().splitlines()]
        assert [set(row) for row in our_rows] == [set(row) for row in their_rows]
        for key in ("doc_id", "doc", "target", "arguments", "doc_hash", "prompt_hash"):
            assert [r[key] for r in our_rows] == [r[key] for r in their_rows], key
        assert all(isinstance(r["resps"], list) and isinstance(r["filtered_resps"], list) for r in our_rows)
    # what lm-eval's hub push loads them with, one task's file a dataset (its own results
    # file, as ours, trips pyarrow over the tokenizer's [token, id] pairs: not compared)
    from datasets import load_dataset

    for f in sample_files:
        loaded = load_dataset("json", data_files=f, split="train", cache_dir=str(tmp_path.parent / "hf"))
        assert len(loaded) == len(Path(f).read_text().splitlines())


def test_the_results_object_is_one_for_the_file_the_command_and_the_job_api(store, tmp_path, run_cli):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from conserve_bench.serve.jobapi import install_job_api
    from conserve_bench.serve.server import ServeConfig

    tmp_path = tmp_path / "results"
    job = submit_job(store, JobSpec(tasks=TASK_FILES[:1]))
    run_job(store, job.id, FakeEngine(), output_dir=tmp_path)  # no --log-samples: no sample files
    assert not [f for f in files_in(tmp_path) if "/samples_" in f]
    pointer = json.loads((tmp_path / f"{job.id}.json").read_text())
    code, stdout, stderr = run_cli("results", job.id, "--db", store.url, "--json")
    assert code == 0, stderr
    assert json.loads(stdout) == pointer
    app = FastAPI()
    install_job_api(app, store, ServeConfig(), "fp")
    api = TestClient(app)
    assert api.get(f"/v1/jobs/{job.id}/results").json() == pointer
    full = api.get(f"/v1/jobs/{job.id}/results", params={"full": "true"}).json()
    assert full["per_sample"] == job_results(store, job.id)["per_sample"]
    # `<job-id>.json` with its table beside it reads back as stored (`ci --compare-to FILE`)
    assert read_results_file(tmp_path / f"{job.id}.json") == job_results(store, job.id)


def test_a_job_written_again_overwrites_its_files_and_a_rerun_adds_a_newer_one(store, tmp_path):
    from lm_eval.utils import get_latest_filename, get_results_filenames

    tmp_path = tmp_path / "results"
    job = submit_job(store, JobSpec(tasks=TASK_FILES[:1]))
    run_job(store, job.id, FakeEngine(), output_dir=tmp_path)
    first = files_in(tmp_path)
    write_results_file(job_results(store, job.id), tmp_path / f"{job.id}.json")  # as `ci` keeps one
    assert files_in(tmp_path) == first
    # a job whose items are all reused (a re-run) or resumed writes the same layout, newer
    again = submit_job(store, JobSpec(tasks=TASK_FILES[:1]), run_key="again")
    rerun = run_job(store, again.id, FakeEngine(), output_dir=tmp_path)
    assert rerun["conserve"]["num_items_computed"] == 0
    (newer,) = set(get_results_filenames(files_in(tmp_path))) - set(first)
    assert get_latest_filename(get_results_filenames(files_in(tmp_path))) == newer
    assert (tmp_path / f"{again.id}.json").is_file()


def test_a_results_file_path_from_a_server_stays_in_the_output_folder(tmp_path):
    from conserve_bench.jobs.results import results_file, write_results

    job = {"id": "j1", "model": "org/model", "updated_at": 0}
    assert results_file({"conserve": {"job": job}}) == "org__model/results_1970-01-01T00-00-00.json"
    for climbing in ("../results_x.json", "a/../../results_x.json", "a/b/results_x.json", "../../x"):
        results = {"results": {}, "conserve": {"job": job, "results_file": climbing}}
        path = write_results(results, tmp_path / "out")
        assert path.parent == tmp_path / "out" / "org__model", climbing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
