"""The Batch API on a real `serve` (vLLM's handlers, the conserve policy's defaults), through
the official `openai` client: a batch of long and short greedy chat completions beside online
requests, the server SIGKILLed mid-batch (engine processes with it) and restarted on its
store. Every line must equal the same request sent alone over HTTP, lines finished before the
kill must not run again, and the long generations must continue from their saved tokens."""

from __future__ import annotations

import json
import signal

import pytest

from conserve_bench.store import Store

from .conftest import KEY, Server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.engine]

LONG_TOKENS, SHORT_TOKENS = 160, 8


def chat_line(i: int, long: bool) -> dict:
    prompt = f"Tell a long story about lighthouse keeper number {i}." if long else f"What is {i} plus {i}?"
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}],
                     "max_tokens": LONG_TOKENS if long else SHORT_TOKENS, "temperature": 0,
                     **({"ignore_eos": True} if long else {})}}


def test_a_batch_survives_a_sigkill_and_answers_as_each_request_alone(tmp_path, data_dir):
    """Servers of its own: its online requests must not reach the session server's step log."""
    openai = pytest.importorskip("openai")
    lines = [chat_line(i, long=i % 3 == 0) for i in range(12)]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()

    server = Server(db_url, data_dir, tmp_path / "first")
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        batch = oai.batches.create(input_file_id=oai.files.create(file=path.open("rb"), purpose="batch").id,
                                   endpoint="/v1/chat/completions", completion_window="24h")
        online = server.http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hello",
                                                          "max_tokens": 8})
        assert online.status_code == 200  # online traffic is served beside the batch
        store = Store(db_url)
        job_id = batch.conserve["job_id"]

        def partly_generated():
            items = store.job_items(job_id)
            done = {i["key"] for i in items if i["state"] == "done"}
            saved = store.partials(job_id)  # NOTE: read only (`resume_partials` counts a resume)
            return (done, saved) if done and any(len(t) >= 32 for t in saved.values()) else None

        done_before, _ = wait_for(partly_generated, "short lines done and long ones part-generated", 300, 0.1)
    finally:
        server.signal(signal.SIGKILL)

    server = Server(db_url, data_dir, tmp_path / "second")
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        final = wait_for(lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b,
                         "the batch completed after the restart", 300, 0.5)
        assert final.request_counts.completed == len(lines) and final.request_counts.failed == 0
        outputs = [json.loads(x) for x in oai.files.content(final.output_file_id).text.splitlines()]
        usages = [o["response"]["body"]["usage"] for o in outputs]
        assert final.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
        assert final.usage.output_tokens == sum(u["completion_tokens"] for u in usages) > 0
        completed = f'conserve_batch_requests{{batch="{batch.id}",state="completed"}} {len(lines)}.0'
        metrics = wait_for(lambda: completed in (m := server.http.get("/metrics").text) and m,
                           "the sweeper's next export (every second)", 10, 0.2)
        assert f'conserve_batch_tokens_total{{batch="{batch.id}",kind="output"}}' in metrics  # lines answered here
        alone = {line["custom_id"]: server.http.post("/v1/chat/completions", json=line["body"]).json()
                 for line in lines}
    finally:
        server.stop()

    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]
    for output in outputs:
        got, expected = output["response"]["body"], alone[output["custom_id"]]
        assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"], output["custom_id"]
        assert got["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
        assert got["usage"] == expected["usage"]
        assert got["id"] == f"chatcmpl-{output['response']['request_id']}"
    runs = store.run_counts(job_id)
    assert all(runs[key] == 1 for key in done_before), "a line done before the kill ran again"
    resumes = store.resumes(job_id)  # item -> its resumes and the saved tokens they reused
    assert all(r["num_resumes"] == 1 and r["num_reused_tokens"] > 0 for r in resumes.values()), resumes
    assert max(r["num_reused_tokens"] for r in resumes.values()) >= 32, resumes
