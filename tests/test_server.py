"""`conserve-bench serve` for real: loopback, SmolLM2, the openai client, signals.

Each server is a subprocess with its own engine; the embedded reference scores come from the
session engine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conserve_bench.config import JobSpec
from conserve_bench.jobs.lifecycle import run_job, submit_job, task_metrics
from conserve_bench.serve.process import ServerProcess
from conserve_bench.store import Store

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "test-key"
TASKS = ["mmlu_anatomy", "mmlu_marketing"]
LIMIT = 12
MAX_INFLIGHT = 8


class Server(ServerProcess):
    def __init__(self, db_url: str, data_dir: str, out_dir, api_key: str | None = KEY,
                 extra_args: tuple[str, ...] = ()):
        store_profile(db_url)  # serve loads it (the conserve policy plans with it)
        args = ["--db", db_url, "--data-dir", data_dir, "--output", str(out_dir),
                "--max-offline-inflight", str(MAX_INFLIGHT), *extra_args]
        super().__init__(args + (["--api-key", api_key] if api_key else []), out_dir)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)


def store_profile(db_url: str) -> None:
    """A profile for this machine, with the coefficients measured on the 2-core CI CPU, so
    that serve loads it rather than profiling (every test server runs the conserve policy)."""
    from conserve_bench.sched.latency import LatencyModel
    from conserve_bench.sched.profiles import Profile, current_key, save_profile

    measured = LatencyModel((0.0389, 0.00203, 0.00213, 4.5e-6, 0.82e-6, 0.00067))
    save_profile(Store(db_url), Profile(current_key("smollm2-135m", "float32"), measured, num_samples=1))


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("server")
    db_url = f"sqlite:///{tmp / 'server.db'}"
    srv = Server(db_url, data_dir, tmp, extra_args=("--step-log", str(tmp / "steps.jsonl")))
    srv.step_log = tmp / "steps.jsonl"
    srv.db_url = db_url
    yield srv
    srv.stop()


def wait_job(http, job_id, until=lambda j: j["state"] == "done", timeout_s=600):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert job["state"] not in ("failed", "cancelled"), job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def embedded_scores(engine, data_dir, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'embedded.db'}")
    job = submit_job(store, JobSpec(tasks=tuple(TASKS), limit=LIMIT, data_dir=data_dir))
    return task_metrics(run_job(store, job.id, engine, output_dir=None))


def test_serve_loads_the_stored_profile(server):
    log = server.log_tail(10**6)
    assert "latency model: fixed=0.0389, prefill_tokens=0.00203" in log
    assert "profiling once" not in log
    assert "online targets: TTFT" in log


def test_auth_is_required_on_online_and_job_routes(server):
    for path in ("/v1/models", "/v1/jobs"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
        assert server.http.get(path).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bad_job_specs_write_nothing(server):
    before = len(server.http.get("/v1/jobs").json()["jobs"])
    bad = server.http.post("/v1/jobs", json={"tasks": ["mmlu_anatomy"], "limit": -3})
    assert bad.status_code == 422 and "limit" in bad.text
    unknown = server.http.post("/v1/jobs", json={"tasks": ["mmlu_nope"]})
    assert unknown.status_code == 400 and "mmlu_nope" in unknown.json()["error"]["message"]
    assert len(server.http.get("/v1/jobs").json()["jobs"]) == before


def test_online_completion_while_a_job_runs_and_job_matches_embedded(server, engine, data_dir, tmp_path):
    from openai import OpenAI

    job = server.http.post("/v1/jobs", json={"tasks": TASKS, "limit": LIMIT}).json()
    wait_job(server.http, job["id"], until=lambda j: j["done"] > 0)
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    completion = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip()
    stream = client.chat.completions.create(model="smollm2-135m", max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "Say hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    running = server.http.get(f"/v1/jobs/{job['id']}").json()
    assert running["state"] == "running" and running["done"] < running["total"]

    wait_job(server.http, job["id"])
    remote = server.http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
    assert remote == embedded_scores(engine, data_dir, tmp_path)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "conserve_online_ttft_seconds_count" in metrics and "conserve_offline_items_total" in metrics
    # The engine ran the conserve policy: offline-only steps, and online steps that offline
    # work filled up to the TBT budget, never beyond the prediction that sized them.
    steps = [json.loads(line) for line in server.step_log.read_text().splitlines()]
    assert {"offline", "mixed"} <= {step["kind"] for step in steps}
    assert all(s["predicted_s"] <= s["budget_s"] for s in steps if s["kind"] == "mixed")
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


def test_sigterm_drains_sigkill_loses_nothing_restart_resumes(tmp_path, engine, data_dir):
    db_url = f"sqlite:///{tmp_path / 'faults.db'}"
    store = Store(db_url)
    first = Server(db_url, data_dir, tmp_path)
    job = first.http.post("/v1/jobs", json={"tasks": TASKS, "limit": LIMIT}).json()
    wait_job(first.http, job["id"], until=lambda j: j["done"] >= j["total"] // 4 > 0)
    assert first.signal(signal.SIGTERM) == 0
    drained = store.get_job(job["id"])
    assert drained.state == "queued" and drained.num_done < drained.num_total
    assert "running" not in store.item_states(job["id"])

    second = Server(db_url, data_dir, tmp_path)  # resumes the queued job by itself
    wait_job(second.http, job["id"], until=lambda j: j["done"] >= j["total"] // 2 and j["state"] == "running")
    second.signal(signal.SIGKILL)

    third = Server(db_url, data_dir, tmp_path)
    try:
        wait_job(third.http, job["id"])
        results = third.http.get(f"/v1/jobs/{job['id']}/results").json()["results"]
    finally:
        third.signal(signal.SIGTERM)
    runs = store.run_counts(job["id"])
    assert min(runs.values()) >= 1
    assert sum(n - 1 for n in runs.values()) <= 2 * MAX_INFLIGHT  # two interruptions
    assert results == embedded_scores(engine, data_dir, tmp_path)


def test_cli_talks_to_the_server(server):
    """`submit --server --wait`, `status`, `jobs` and `results` print the embedded JSON shapes."""
    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "conserve_bench.cli", *args, "--server", server.url,
                              "--api-key", KEY, "--json"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    summary = cli("submit", "mmlu_marketing", "--limit", "2", "--wait")
    assert set(summary["results"]["mmlu_marketing"]) >= {"acc,none"}
    status = cli("status", summary["id"])
    assert (status["state"], status["done"], status["total"]) == ("done", 8, 8)
    assert summary["id"] in [j["id"] for j in cli("jobs")["jobs"]]
    assert cli("results", summary["id"]) == summary
    denied = subprocess.run([sys.executable, "-m", "conserve_bench.cli", "jobs", "--server", server.url],
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and denied.stderr.startswith("error: unauthorized")
