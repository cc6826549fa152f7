"""What a client sends to the job API is bounded and never a server path or code: tasks are
names of the server's task index, a data_dir lies under the folders it offers, sizes and
generation arguments are capped, and no error names the store or a server path. In process
(FastAPI's TestClient on `install_job_api`) with the fake engine: no vLLM."""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conserve_bench.config import JobSpec, LeaseConfig
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.errors import (GenKwargsError, StoreUnavailableError, TaskNameError,
                                   UnknownTaskError)
from conserve_bench.jobs.genkwargs import check_gen_kwargs
from conserve_bench.jobs.lifecycle import run_job, submit_job
from conserve_bench.jobs.taskspec import check_tasks, task_manager
from conserve_bench.serve.jobapi import (MAX_LIMIT, MAX_NUM_FEWSHOT, MAX_SAMPLES,
                                         MAX_TASKS_PER_JOB, install_job_api, redact)
from conserve_bench.serve.server import ServeConfig, ServeConfigError
from conserve_bench.store import JobState, Store, WorkItem

from .conftest import TEST_TASKS

MAX_MODEL_LEN = 2048
TASK = "mmlu_anatomy"


def job_api(store, max_model_len: int | None = MAX_MODEL_LEN, **cfg) -> TestClient:
    app = FastAPI()
    install_job_api(app, store, ServeConfig(**cfg), "fp", max_model_len)
    return TestClient(app)


@pytest.fixture
def evil_task(tmp_path):
    """A task YAML whose `!function` module, once imported, leaves a marker file: (the YAML,
    the marker)."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "evil_code.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef load(**_):\n    raise SystemExit('ran')\n")
    (folder / "evil.yaml").write_text(
        "task: evil\ncustom_dataset: !function evil_code.load\noutput_type: loglikelihood_rolling\n"
        "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    return folder / "evil.yaml", marker


def run_stored_jobs(store) -> None:
    """Run every stored job as the pump would (on the fake engine), whatever it raises."""
    for job in store.list_jobs():
        with contextlib.suppress(BaseException):  # NOTE: the YAML's function exits
            run_job(store, job.id, FakeEngine(), output_dir=None, retry_failed=False)


# -- tasks are names, never paths -------------------------------------------------------------------


def test_a_task_path_or_pattern_is_a_400_and_its_code_never_runs(store, evil_task):
    evil_yaml, marker = evil_task
    http = job_api(store)
    for tasks in ([str(evil_yaml)], [TASK, str(evil_yaml)], "evil/evil.yaml", ["evil.yaml"],
                  ["~/evil.yaml"], ["../evil"], ["mmlu_anat*"], ["mmlu_anatom?"], ["mmlu_[a]natomy"]):
        answer = http.post("/v1/jobs", json={"tasks": tasks})
        assert answer.status_code == 400, tasks
        error = answer.json()["error"]
        assert error["type"] == "TaskNameError" and "\n" not in error["message"], tasks
        assert str(evil_yaml.parent) not in error["message"]
    assert store.list_jobs() == []  # nothing written
    run_stored_jobs(store)
    assert not marker.exists()


def test_a_bare_name_is_never_read_from_the_working_directory(store, evil_task, monkeypatch):
    """A name the job API took (from another replica's index, say) that this index lacks is
    unknown when the job runs: lm-eval would load a file of that name in the working
    directory, and its code with it."""
    evil_yaml, marker = evil_task
    evil_yaml.rename(evil_yaml.parent / "evil_task")
    monkeypatch.chdir(evil_yaml.parent)
    job = store.create_job(JobSpec(tasks=("evil_task",)))
    with pytest.raises(UnknownTaskError, match="unknown task 'evil_task'"):
        run_job(store, job.id, FakeEngine(), output_dir=None)
    assert not marker.exists()


def test_a_path_stays_allowed_where_the_caller_allows_it(run_cli):
    """`submit` on one's own machine takes a task YAML by path (the CLI's default)."""
    tiny = str(TEST_TASKS / "conserve_tiny_gen.yaml")
    manager = task_manager()
    assert check_tasks([tiny], manager, allow_paths=True) == [tiny]
    with pytest.raises(TaskNameError, match="is a path"):
        check_tasks([tiny], manager)
    code, out, err = run_cli("submit", tiny, "--no-wait", "--json")
    assert code == 0, err
    assert json.loads(out)["tasks"] == [tiny]


def test_an_include_path_adds_its_tasks_by_name_to_the_api_and_the_pump(store):
    request = {"tasks": ["conserve_tiny_gen"], "limit": 3}
    unknown = job_api(store).post("/v1/jobs", json=request)
    assert unknown.status_code == 400 and unknown.json()["error"]["type"] == "UnknownTaskError"
    http = job_api(store, include_paths=(str(TEST_TASKS),))
    job = http.post("/v1/jobs", json=request).json()
    assert store.get_job(job["id"]).spec.tasks == ("conserve_tiny_gen",)  # a name, no path
    run_job(store, job["id"], FakeEngine(), output_dir=None, include_paths=(str(TEST_TASKS),))
    assert store.get_job(job["id"]).state == JobState.DONE


def test_serve_refuses_an_include_path_or_data_root_that_is_no_folder(tmp_path):
    for field in ("include_paths", "data_roots"):
        with pytest.raises(ServeConfigError, match="is not a folder"):
            ServeConfig(**{field: (str(tmp_path / "nope"),)})


# -- data_dir under the offered roots ---------------------------------------------------------------


def test_a_data_dir_outside_the_roots_is_refused_alike_whether_it_exists_or_not(store, tmp_path):
    root, private = tmp_path / "offered", tmp_path / "private"
    (root / "mmlu" / "test").mkdir(parents=True)
    (private / "test").mkdir(parents=True)
    (root / "link").symlink_to(private)
    http = job_api(store, data_roots=(str(root),))
    outside = [private, tmp_path / "missing", root / ".." / "private", root / "link",
               root / "link" / "test", "offered/mmlu", "/"]
    answers = {json.dumps(http.post("/v1/jobs", json={"tasks": [TASK], "data_dir": str(d)}).json())
               for d in outside}
    assert len(answers) == 1  # one answer for all, existing or not
    error = json.loads(answers.pop())["error"]
    assert error["type"] == "DataDirError" and str(tmp_path) not in error["message"]
    no_test = http.post("/v1/jobs", json={"tasks": [TASK], "data_dir": str(root)})
    assert no_test.status_code == 400 and "test/" in no_test.text and str(tmp_path) not in no_test.text
    assert store.list_jobs() == []

    inside = http.post("/v1/jobs", json={"tasks": [TASK], "data_dir": str(root / "x" / ".." / "mmlu")})
    assert inside.status_code == 201, inside.text
    assert store.get_job(inside.json()["id"]).spec.data_dir == os.path.realpath(root / "mmlu")


def test_the_servers_data_dir_is_the_default_root_and_none_means_no_data_dir(store, tmp_path):
    for name in ("mmlu", "other"):
        (tmp_path / name / "test").mkdir(parents=True)
    body = {"tasks": [TASK], "data_dir": str(tmp_path / "other")}
    own = job_api(store, data_dir=str(tmp_path / "mmlu")).post("/v1/jobs", json=body)
    assert own.status_code == 400 and "serve --data-root" in own.json()["error"]["message"]
    none = job_api(store).post("/v1/jobs", json=body)
    assert none.status_code == 400 and "takes no data_dir" in none.json()["error"]["message"]
    assert store.list_jobs() == []


# -- bounds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, field", [
    ({"tasks": [TASK] * (MAX_TASKS_PER_JOB + 1)}, "tasks"),
    ({"tasks": ["t" * 201]}, "tasks"),
    ({"limit": MAX_LIMIT + 1}, "limit"),
    ({"limit": 1e12}, "limit"),
    ({"num_fewshot": MAX_NUM_FEWSHOT + 1}, "num_fewshot"),
    ({"run_key": "k" * 201}, "run_key"),
    ({"data_dir": "/" + "d" * 5000}, "data_dir"),
    ({"samples": {f"t{i}": [0] for i in range(MAX_TASKS_PER_JOB + 1)}}, "samples"),
    ({"samples": {TASK: list(range(MAX_SAMPLES + 1))}}, "samples"),
    ({"samples": {TASK: list(range(MAX_SAMPLES // 2 + 1)), "x": list(range(MAX_SAMPLES // 2))}}, "samples"),
    ({"samples": {TASK: [2**40]}}, "samples"),
    ({"gen_kwargs": {"max_gen_toks": 1e12}}, "gen_kwargs"),
    ({"gen_kwargs": {"temperature": "hot"}}, "gen_kwargs"),
    ({"gen_kwargs": {"num_beams": 4}}, "gen_kwargs"),  # no SamplingParams field
    ({"gen_kwargs": {"logprobs": 5}}, "gen_kwargs"),  # breaks the engine's contract
    ({"gen_kwargs": {"max_gen_toks": MAX_MODEL_LEN}}, "gen_kwargs"),  # no prompt token left
])
def test_what_exceeds_a_bound_is_a_422_naming_the_field(store, extra, field):
    answer = job_api(store).post("/v1/jobs", json={"tasks": [TASK], **extra})
    assert answer.status_code == 422, answer.text
    assert any(field in error["loc"] for error in answer.json()["detail"])
    assert store.list_jobs() == []


def test_generation_arguments_in_range_pass_the_api(store):
    gen_kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": MAX_MODEL_LEN - 1, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 1234}
    answer = job_api(store).post("/v1/jobs", json={"tasks": [TASK], "gen_kwargs": gen_kwargs})
    assert answer.status_code == 201, answer.text
    assert store.get_job(answer.json()["id"]).spec.gen_kwargs == gen_kwargs


@pytest.mark.parametrize("gen_kwargs, named", [
    ({"max_gen_toks": 1e12}, "max_gen_toks"), ({"max_gen_toks": 0}, "max_gen_toks"),
    ({"max_gen_toks": True}, "max_gen_toks"), ({"max_new_tokens": "64"}, "max_new_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"), ({"do_sample": "yes"}, "do_sample"), ({"until": [1]}, "until"),
    ({"until": ["x"] * 33}, "until"), ({"until": [""]}, "until"), ({"until": "s" * 257}, "until"),
    ({"temprature": 0.5}, "did you mean 'temperature'"), ({"num_beams": 4}, "unknown"),
])
def test_generation_arguments_of_the_wrong_type_or_range_are_refused(gen_kwargs, named):
    with pytest.raises(GenKwargsError, match=named):
        check_gen_kwargs(gen_kwargs)


def test_generation_arguments_are_bounded_by_the_context_length_and_checked_on_submit(store):
    check_gen_kwargs({"max_gen_toks": 4096})  # no context length known
    with pytest.raises(GenKwargsError, match="context length 2048"):
        check_gen_kwargs({"max_gen_toks": 4096}, max_model_len=2048)
    check_gen_kwargs({"num_beams": 4, "until": None}, unknown_ok=True)
    with pytest.raises(GenKwargsError, match="must be an object"):
        check_gen_kwargs(["temperature"])
    with pytest.raises(GenKwargsError, match="temperature"):  # `submit`, `ci`: the same rule
        submit_job(store, JobSpec(tasks=(TASK,), gen_kwargs={"temperature": "hot"}))
    assert store.list_jobs() == []


def test_requests_generation_arguments_are_checked_but_other_backends_pass(store):
    http = job_api(store)
    hot = http.post("/v1/jobs/requests", json={"requests": [
        {"kind": "generate_until", "args": ["Q:", {"temperature": "hot"}]}]})
    assert hot.status_code == 422 and "temperature" in hot.text
    assert store.list_jobs() == []
    beams = http.post("/v1/jobs/requests", json={"requests": [
        {"kind": "generate_until", "args": ["Q:", {"num_beams": 1, "max_gen_toks": 8}]}]})
    assert beams.status_code == 201, beams.text


# -- a run key posted again retries; errors name nothing of the server ------------------------------


def test_a_run_key_posted_again_retries_the_failed_items_of_its_job(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'once.db'}", LeaseConfig(max_attempts=1))
    http = job_api(store)
    body = {"tasks": [TASK], "limit": 2, "run_key": "nightly-1"}
    job_id = http.post("/v1/jobs", json=body).json()["id"]
    store.add_items(job_id, [WorkItem(f"k{i}", "loglikelihood_rolling", [f"text {i}"]) for i in range(3)])

    def fail_two(state: JobState) -> None:
        store.claim_items(job_id, "w", 3)
        store.complete_items("w", {"k0": -1.0})
        store.fail_items("w", {"k1": "boom", "k2": "boom"})
        store.set_job_state(job_id, state)
        assert store.item_states(job_id) == {"done": 1, "failed": 2}

    fail_two(JobState.FAILED)
    again = http.post("/v1/jobs", json=body)
    assert again.status_code == 200 and again.json()["id"] == job_id
    assert (again.json()["state"], again.json()["failed"]) == ("queued", 0)
    assert store.item_states(job_id) == {"done": 1, "pending": 2}

    fail_two(JobState.RUNNING)  # failed items of a job still running (on another replica)
    assert http.post("/v1/jobs", json=body).json()["state"] == "running"
    assert store.item_states(job_id) == {"done": 1, "pending": 2}


def test_a_store_outage_is_a_503_and_no_error_names_the_store_or_a_server_path(store, tmp_path,
                                                                               monkeypatch):
    http = job_api(store, data_dir=str(tmp_path / "gone"))
    missing = http.get("/v1/jobs/nope")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no job 'nope'"
    no_data = http.post("/v1/jobs", json={"tasks": [TASK]})  # the server's own data_dir is gone
    assert no_data.status_code == 400 and str(tmp_path) not in no_data.text

    def outage(*args, **kwargs):
        raise StoreUnavailableError("database postgresql+psycopg://eval:pw@db.internal/conserve "
                                    "unreachable for 30 s: connection refused")

    monkeypatch.setattr(store, "_retrying", outage)  # NOTE: where every transaction gives up
    for answer in (http.get("/v1/jobs"), http.get("/v1/jobs/abc"), http.post("/v1/jobs/abc/cancel")):
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "StoreUnavailableError"
        assert "db.internal" not in answer.text and "postgresql" not in answer.text


def test_redact_hides_urls_and_server_paths_but_keeps_the_sentence():
    message = ("cannot open sqlite:////srv/conserve.db: data directory '/srv/mmlu' or ~/x "
               "or ../up has no test/ folder")
    assert redact(message) == ("cannot open <hidden> data directory '<hidden>' or <hidden> "
                               "or <hidden> has no test/ folder")


def test_a_status_answer_is_reused_while_the_state_holds_and_it_is_young_against_its_cost():
    """Counting a job's items takes the server's CPU (the engine's, on a CPU-only host):
    clients polling a subject, however often, take at most `POLL_SHARE` of it."""
    from conserve_bench.serve.jobapi import POLL_SHARE, PollCache

    clock, computed = [0.0], []

    def count(done: int):
        def compute():
            computed.append(done)
            clock[0] += 0.05  # a count takes 50 ms: its answer is kept 50 ms / POLL_SHARE
            return {"done": done}
        return compute

    polls = PollCache(clock=lambda: clock[0])
    assert polls.answer("j", "running", count(0)) == {"done": 0}
    clock[0] += 0.045 / POLL_SHARE - 0.05  # just short of the 50 ms' share
    assert polls.answer("j", "running", count(1)) == {"done": 0} and computed == [0]
    assert polls.answer("k", "running", count(7)) == {"done": 7}  # each subject its own
    clock[0] += 0.01 / POLL_SHARE
    assert polls.answer("j", "running", count(2)) == {"done": 2}
    assert polls.answer("j", "done", count(3)) == {"done": 3}  # a new state: counted at once


def test_status_polls_of_a_job_reuse_its_count_until_its_state_changes(store, monkeypatch):
    from conserve_bench.serve import jobapi

    job = store.create_job(JobSpec(tasks=(TASK,)))
    store.add_items(job.id, [WorkItem(f"k{i}", "loglikelihood", {"i": i}) for i in range(3)])
    counted, count = [], jobapi.lifecycle.job_status

    def slow_count(store_, job_id):  # NOTE: 0.1 s: its answer is kept 5 s
        counted.append(job_id)
        time.sleep(0.1)
        return count(store_, job_id)

    monkeypatch.setattr(jobapi.lifecycle, "job_status", slow_count)
    client = job_api(store)
    assert client.get(f"/v1/jobs/{job.id}").json()["done"] == 0
    store.complete_items("me", {w.key: [-1.0, True] for w in store.claim_items(job.id, "me", 1)})
    assert client.get(f"/v1/jobs/{job.id}").json()["done"] == 0 and len(counted) == 1  # reused
    store.cancel_job(job.id)
    answer = client.get(f"/v1/jobs/{job.id}").json()
    assert (answer["state"], answer["done"], len(counted)) == ("cancelled", 1, 2)
    assert client.get("/v1/jobs/no-such-job").status_code == 404 and len(counted) == 2
