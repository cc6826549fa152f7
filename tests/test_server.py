"""`conserve-bench serve` for real: loopback, SmolLM2, the openai client, the CLI, signals.

The tests share the session's server (conftest `shared_server`); the last one kills it, so
it runs last. The fleet test runs on the session's two PostgreSQL replicas (`pg_replicas`).
The embedded reference scores come from the session engine.
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from benchmarks.score_independence import compare, same_results
from conserve_bench.config import JobSpec
from conserve_bench.jobs.lifecycle import run_job, submit_job, task_metrics
from conserve_bench.store import Store

from .conftest import KEY, SERVER_MAX_INFLIGHT, TEST_TASKS, Server, cli

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TASKS = ["mmlu_anatomy", "mmlu_marketing"]
LIMIT = 12
# NOTE: big enough that the job outlives the online requests sent while it runs, on fast hosts too
ONLINE_TEST_LIMIT = 40


def embedded_scores(engine, data_dir, tmp_path, tasks=TASKS, limit=LIMIT):
    store = Store(f"sqlite:///{tmp_path / 'embedded.db'}")
    job = submit_job(store, JobSpec(tasks=tuple(tasks), limit=limit, data_dir=data_dir))
    return task_metrics(run_job(store, job.id, engine, output_dir=None))


def test_serve_loads_the_stored_profile(server):
    log = server.log_tail(10**6)
    assert "latency model: fixed=0.0389, prefill_tokens=0.00203" in log
    assert "profiling once" not in log
    # no SLOs given: the bounded default with the share derived from the profile, on one line
    from conserve_bench.sched.policy import derived_max_slowdown

    share = derived_max_slowdown(None)  # the stored profile carries no held-out error
    assert f"conserve: bounded: offline work adds <= {share:.0%} to a step's online decodes" in log


def test_vllms_worker_runs_in_the_engine_core_process(server):
    """One vLLM process under `serve` on the CPU build, the engine core with its worker in it
    (`engine.local.executor_backend`): vLLM's own CPU layout starts the worker in another."""
    import psutil
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's own executor stays on accelerators")
    names = [child.name() for child in psutil.Process(server.proc.pid).children(recursive=True)]
    assert [name for name in names if name.startswith("VLLM::")] == ["VLLM::EngineCore"], names


def test_auth_is_required_on_every_route_but_health(server):
    for path in ("/v1/models", "/v1/jobs", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
        assert server.http.get(path).status_code == 200
    # vLLM's own check leaves these open; the guard closes them
    prompt = {"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1, "priority": -100}
    for path in ("/invocations", "/tokenize", "/detokenize"):
        assert httpx.post(f"{server.url}{path}", json=prompt).status_code == 401, path
    assert server.http.post("/tokenize", json=prompt).status_code == 200  # NOTE: generates nothing
    assert server.http.post("/v1/completions", content=b"x" * (2 << 20)).status_code == 413
    health = httpx.get(f"{server.url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


def test_bad_job_specs_write_nothing(server):
    before = len(server.http.get("/v1/jobs").json()["jobs"])
    bad = server.http.post("/v1/jobs", json={"tasks": ["mmlu_anatomy"], "limit": -3})
    assert bad.status_code == 422 and "limit" in bad.text
    unknown = server.http.post("/v1/jobs", json={"tasks": ["mmlu_nope"]})
    assert unknown.status_code == 400 and "mmlu_nope" in unknown.json()["error"]["message"]
    assert len(server.http.get("/v1/jobs").json()["jobs"]) == before


def test_online_completion_while_a_job_runs_and_job_matches_embedded(server, engine, data_dir, tmp_path):
    from openai import OpenAI

    job = server.http.post("/v1/jobs", json={"tasks": TASKS, "limit": ONLINE_TEST_LIMIT}).json()
    server.wait_job(job["id"], until=lambda j: j["done"] > 0)
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    completion = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip()
    stream = client.chat.completions.create(model="smollm2-135m", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "Say hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    running = server.http.get(f"/v1/jobs/{job['id']}").json()
    assert running["state"] == "running" and running["done"] < running["total"]

    server.wait_job(job["id"])
    remote = task_metrics(server.http.get(f"/v1/jobs/{job['id']}/results").json())
    assert remote == embedded_scores(engine, data_dir, tmp_path, limit=ONLINE_TEST_LIMIT)
    metrics = server.http.get("/metrics").text
    assert "conserve_online_ttft_seconds_count" in metrics and "conserve_offline_items_total" in metrics
    # The engine ran the conserve policy: offline-only steps, and online steps that offline
    # work filled up to the step's budget, never beyond the prediction that sized them. An
    # offline prompt's chunk joins online decodes only in a step that already runs a prefill:
    # the profile prices a mixed batch (5 ms) above the 5% share of a decode step (2 ms).
    steps = [json.loads(line) for line in server.step_log.read_text().splitlines()]
    assert {"offline", "online"} <= {step["kind"] for step in steps}
    assert all(s["predicted_s"] <= s["budget_s"] for s in steps if s["kind"] == "mixed")
    assert all(sum(n for n, _, _ in s["prefills"]) > s["offline_tokens"]  # MMLU: no offline decodes
               for s in steps if s["kind"] == "mixed" and s["decodes"])

    # Each line also says whose tokens ran (what `bench` reads) and when the step ended.
    def num_tokens(step):
        return sum(n for n, _, _ in step["prefills"]) + len(step["decodes"])
    assert all(s["offline_tokens"] == num_tokens(s) for s in steps if s["kind"] == "offline")
    assert all(0 < s["offline_tokens"] < num_tokens(s) for s in steps if s["kind"] == "mixed")
    assert all(s["offline_tokens"] == 0 for s in steps if s["kind"] == "online")
    assert [s["end_at"] for s in steps] == sorted(s["end_at"] for s in steps)
    # Layer-wise preemption (on under conserve) cut offline-only steps alone, and the scores
    # above are unchanged; each online request is logged once, with its server-side queue.
    assert all(s["kind"] == "offline" for s in steps if s.get("aborted"))
    assert sum(len(s.get("online_queue_ms", ())) for s in steps) == 2


def test_cli_talks_to_the_server(server):
    """`submit --server --wait`, `status`, `jobs` and `results` print the embedded JSON shapes."""
    def remote(*args):
        out = cli(*args, "--server", server.url, "--api-key", KEY, "--json", timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    summary = remote("submit", "mmlu_marketing", "--limit", "2", "--wait")  # lm-eval's results object
    assert set(summary["results"]["mmlu_marketing"]) >= {"acc,none"}
    job_id = summary["conserve"]["job"]["id"]
    status = remote("status", job_id)
    assert (status["state"], status["done"], status["total"]) == ("done", 8, 8)
    assert job_id in [j["id"] for j in remote("jobs")["jobs"]]
    newest = remote("jobs", "--limit", "1")
    assert [j["id"] for j in newest["jobs"]] == [job_id] and newest["num_jobs"] >= 1
    assert remote("results", job_id) == summary
    denied = cli("jobs", "--server", server.url)
    assert denied.returncode != 0 and denied.stderr.startswith("error: unauthorized")
    num_jobs = len(remote("jobs")["jobs"])
    other = cli("submit", "mmlu_marketing", "--model", "HuggingFaceTB/SmolLM2-360M", "--server", server.url,
                "--api-key", KEY)
    assert other.returncode == 2
    assert other.stderr.strip().endswith("serves smollm2-135m, not HuggingFaceTB/SmolLM2-360M")
    assert len(remote("jobs")["jobs"]) == num_jobs  # nothing queued


def test_a_run_key_answers_the_same_job(server):
    body = {"tasks": ["mmlu_marketing"], "limit": 3, "run_key": "api-1"}
    first, again = server.http.post("/v1/jobs", json=body), server.http.post("/v1/jobs", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["run_key"] == "api-1"
    other = server.http.post("/v1/jobs", json={**body, "limit": 4})
    assert other.status_code == 409 and "api-1" in other.json()["error"]["message"]
    unsorted = server.http.post("/v1/jobs", json={"tasks": ["mmlu_marketing"], "run_key": "api-2",
                                                  "samples": {"mmlu_marketing": [3, 1]}})
    assert unsorted.status_code == 422 and "doc indices must be distinct, sorted" in unsorted.text
    assert server.http.post("/v1/jobs", json={**body, "run_key": ""}).status_code == 422


def test_ci_on_the_server_stops_at_its_deadline_and_resumes_by_run_key(server, tmp_path, run_cli):
    import yaml

    doc = {"model": "smollm2-135m", "limit": LIMIT,
           "tasks": {t: {"metrics": {"acc": {"baseline": 0.0, "atol": 1.0}}} for t in TASKS}}
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(doc))
    args = ["ci", config, "--server", server.url, "--api-key", KEY, "--run-key", "srv", "--json",
            "--output", tmp_path / "results"]
    code, stdout, stderr = run_cli(*args, "--time-budget", "1")  # past its stop time at once
    stopped = json.loads(stdout)
    assert code == 4 and stopped["status"] == "incomplete", stderr
    (job,) = stopped["jobs"]
    assert job["run_key"].startswith("srv/")
    code, stdout, stderr = run_cli(*args)
    done = json.loads(stdout)
    assert code == 0, stderr
    assert [j["id"] for j in done["jobs"]] == [job["id"]] and done["jobs"][0]["state"] == "done"
    listed = server.http.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed if j["run_key"] == job["run_key"]] == [job["id"]]
    assert {r["task"]: r["n"] for r in done["rows"]} == {t: LIMIT for t in TASKS}
    assert (tmp_path / "results" / f"{job['id']}.samples.jsonl").is_file()  # fetched with the results
    code, _, stderr = run_cli(*args[:-2], "--output", tmp_path / "r2", "--compare-to", job["id"])
    assert code == 0, stderr
    doc["model"] = "another-model"
    config.write_text(yaml.safe_dump(doc))
    code, _, stderr = run_cli(*args)
    assert code == 2 and "model: the server at" in stderr and "serves smollm2-135m, not another-model" in stderr


FLEET_LIMIT = 10


def test_two_replicas_on_postgresql_share_one_job(pg_replicas, engine, data_dir, tmp_path):
    """Fleet mode for real: two `serve` replicas on one PostgreSQL store and a job recorded by
    `submit --no-wait`; both compute its items, and its scores are those of one embedded run.
    (Kills, drains, poisoned items and database restarts: tests/test_fleet.py, fake engine.)"""
    try:
        replicas, url = pg_replicas.get(), pg_replicas.db_url
        queued = cli("submit", "mmlu_marketing", "--limit", str(FLEET_LIMIT), "--data-dir", data_dir,
                     "--db", url, "--no-wait", "--json")
        assert queued.returncode == 0, queued.stderr
        job_id = json.loads(queued.stdout)["id"]
        assert len(replicas[1].http.get("/v1/jobs").json()["replicas"]) == 2
        status = replicas[0].wait_job(job_id)
        remote = task_metrics(replicas[1].http.get(f"/v1/jobs/{job_id}/results").json())
    finally:
        pg_replicas.stop()
    assert status["done"] == status["total"] == 4 * FLEET_LIMIT
    assert len(status["replicas"]) == 2 and all(r["done"] > 0 for r in status["replicas"])
    assert set(Store(url).run_counts(job_id).values()) == {1}
    assert remote == embedded_scores(engine, data_dir, tmp_path, ["mmlu_marketing"], FLEET_LIMIT)


def test_an_engine_death_hands_items_back_exits_3_and_a_restart_finishes(shared_server, data_dir):
    """SIGKILL of vLLM's engine-core process mid-job: the server gives the job's items back
    (the job is queued again, never failed) and exits 3, as vLLM's own server exits when its
    engine dies, so that a supervisor restarts it; the restarted server finishes the job by
    itself, computing again at most the in-flight window. The restart becomes the session's
    server."""
    import psutil

    dying = shared_server.take()
    job = dying.http.post("/v1/jobs", json={"tasks": ["mmlu_virology"], "limit": ONLINE_TEST_LIMIT}).json()
    dying.wait_job(job["id"], until=lambda j: j["done"] >= 8)
    core = next(p for p in psutil.Process(dying.proc.pid).children(recursive=True)
                if p.name().startswith("VLLM::EngineCore"))
    core.kill()
    assert dying.proc.wait(timeout=120) == 3
    dying.kill()
    store = Store(dying.db_url)
    assert store.get_job(job["id"]).state == "queued"
    assert set(store.item_states(job["id"])) <= {"done", "pending"}

    restarted = Server(dying.db_url, data_dir, shared_server.folder)
    shared_server.give(restarted)
    assert restarted.wait_job(job["id"])["done"] == 4 * ONLINE_TEST_LIMIT
    assert sum(n - 1 for n in store.run_counts(job["id"]).values()) <= SERVER_MAX_INFLIGHT


# NOTE: last in this module: it kills the shared server (a later user would start another).
def test_sigkill_loses_nothing_restart_resumes_sigterm_drains_generations_continue(
        shared_server, engine, data_dir, tmp_path):
    """A job of questions, then long generations, on the server. SIGKILL (server and engine
    processes) at a quarter of its questions; a new server on the same store resumes the job
    by itself; SIGTERM once half the generations' tokens are saved drains it back to
    queued; `resume` in this process finishes it, each generation continued from its
    partial: the scores and texts of an uninterrupted run, its loglikelihoods within
    docs/scoring.md's bound."""
    tasks = ["mmlu_astronomy", "mmlu_college_biology",  # nothing of the other tests' items
             "conserve_tiny_long"]  # 4 openings, never meeting the stop (--include-path)
    num_questions, generated_tokens = 2 * LIMIT * 4, 4 * 256
    killed = shared_server.take()
    job = killed.http.post("/v1/jobs", json={"tasks": tasks, "limit": LIMIT}).json()
    killed.wait_job(job["id"], until=lambda j: j["done"] >= num_questions // 4)
    killed.signal(signal.SIGKILL)
    store = Store(killed.db_url)
    assert store.get_job(job["id"]).state == "running"  # as the kill left it
    done_at_kill = {i["key"] for i in store.job_items(job["id"]) if i["state"] == "done"}

    restarted = Server(killed.db_url, data_dir, tmp_path)
    try:
        restarted.wait_job(job["id"], until=lambda j: j["partial_tokens"] >= generated_tokens // 2)
        assert restarted.signal(signal.SIGTERM) == 0
    finally:
        restarted.kill()
    drained = store.get_job(job["id"])
    assert drained.state == "queued" and drained.num_done == num_questions
    assert drained.num_partial_items == 4 and "running" not in store.item_states(job["id"])

    output = run_job(store, job["id"], engine, output_dir=None, include_paths=(str(TEST_TASKS),))
    runs = store.run_counts(job["id"])
    generations = {i["key"] for i in store.job_items(job["id"]) if i["kind"] == "generate_until"}
    assert len(done_at_kill) >= num_questions // 4 and all(runs[k] == 1 for k in done_at_kill)
    assert all(runs[k] >= 2 for k in generations)  # drained mid-way, then continued here
    assert sum(n - 1 for n in runs.values()) <= 2 * SERVER_MAX_INFLIGHT  # two interruptions
    assert output["conserve"]["resumes"]["num_resumes"] == 4
    assert output["conserve"]["resumes"]["num_reused_tokens"] == drained.num_partial_tokens
    assert output["conserve"]["num_generated_tokens"] == generated_tokens - drained.num_partial_tokens

    clean_store = Store(f"sqlite:///{tmp_path / 'clean.db'}")
    included = (str(TEST_TASKS),)
    clean = submit_job(clean_store, JobSpec(tasks=tuple(tasks), limit=LIMIT, data_dir=data_dir),
                       include_paths=included)
    clean_output = run_job(clean_store, clean.id, engine, output_dir=None, include_paths=included)
    # NOTE: the served questions ran in the server's batches, the clean ones in this engine's:
    # equal as docs/scoring.md promises (the last bits of a loglikelihood follow the batch)
    difference = compare([{"items": store.job_items(job["id"]), "metrics": task_metrics(output)}],
                         [{"items": clean_store.job_items(clean.id),
                           "metrics": task_metrics(clean_output)}])
    assert difference["num_requests"] == num_questions + 4 and same_results(difference), difference
