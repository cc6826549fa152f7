"""The OpenAI Batch API without vLLM: input files, the store's batches, a batch's life through
the pump (created, run, finalized; expired, cancelled, finalized again after a crash), and
the HTTP API as the official `openai` client sees it. Lines run on `OpenAIRequestEngine` over
stand-in handlers (the real handlers are vLLM's: tests/test_batch_engine.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import sqlalchemy as sa

from conserve_bench.batches import lifecycle
from conserve_bench.batches.lines import BatchFileError, parse_lines
from conserve_bench.batches.objects import progress, window_seconds
from conserve_bench.config import RunConfig
from conserve_bench.engine.fake import FAKE_FINGERPRINT
from conserve_bench.engine.openai_requests import OfflineClient, OpenAIRequestEngine
from conserve_bench.errors import InvalidRequestError, JobStateError
from conserve_bench.serve.guard import DEFAULT_MAX_REQUEST_BYTES, GuardConfig
from conserve_bench.serve.pump import OfflinePump
from conserve_bench.store import BatchStatus, JobState, RequestCounts

from .conftest import wait_for

BOTH_DIALECTS = True
URL = "/v1/completions"


def request_line(custom_id: str, prompt="hello", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": URL,
                       "body": {"model": "fake-model", "prompt": prompt, **body}})


def batch_file(n: int, bad: tuple[int, ...] = ()) -> bytes:
    """`n` requests; those at `bad` have a body the endpoint refuses (no prompt)."""
    lines = [request_line(f"r{i}", prompt=None if i in bad else f"prompt {i}") for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


# -- input files ------------------------------------------------------------------------------


@pytest.mark.parametrize("second, line, words", [
    ("{not json", 2, "not valid JSON"),
    ("[1, 2]", 2, "JSON object"),
    (json.dumps({"method": "POST", "url": URL, "body": {}}), 2, "'custom_id' must be a string"),
    (json.dumps({"custom_id": "x", "method": "GET", "url": URL, "body": {}}), 2, "method must be 'POST'"),
    (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}), 2, "not the batch's endpoint"),
    (request_line("r0"), 2, "custom_id 'r0' is used twice"),
    (request_line("x", stream=True), 2, "cannot stream"),
    (json.dumps({"custom_id": "x", "method": "POST", "url": URL, "body": {}, "extra": 1}), 2, "unknown field"),
])
def test_a_malformed_file_is_refused_whole_naming_its_first_bad_line(second, line, words):
    content = f"{request_line('r0')}\n{second}\n{request_line('r2')}\n".encode()
    with pytest.raises(BatchFileError) as refused:
        parse_lines(content, URL)
    assert refused.value.line == line and str(refused.value).startswith(f"line {line}: ")
    assert words in str(refused.value)


def test_blank_lines_are_skipped_and_lines_keep_their_order():
    lines = parse_lines(f"\n{request_line('b')}\n\n{request_line('a')}\n".encode(), URL)
    assert [(line.index, line.custom_id) for line in lines] == [(0, "b"), (1, "a")]


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe"])
def test_an_empty_or_undecodable_file_is_refused(content):
    with pytest.raises(BatchFileError):
        parse_lines(content, URL)


def test_completion_windows():
    assert window_seconds("24h") == 86400 and window_seconds("90m") == 5400 and window_seconds("5s") == 5
    for bad in ("", "24", "0h", "-1h", "1d", "169h"):
        with pytest.raises(InvalidRequestError):
            window_seconds(bad)


def test_a_body_limit_of_its_own_for_uploads():
    cfg = GuardConfig(max_upload_bytes=5 << 20)
    assert cfg.body_limit("POST", "/v1/files") == 5 << 20
    assert cfg.body_limit("GET", "/v1/files") == cfg.body_limit("POST", "/v1/batches") == DEFAULT_MAX_REQUEST_BYTES


# -- stand-in handlers on a loop of their own, as the server's -----------------------------------


class Handlers:
    """Answers a completion body as an endpoint would: its prompt reversed (200; a prompt
    token per character, the first two cached), or 400 without a prompt; each answer after
    `delay_s`. `seen`: the request ids it ran."""

    def __init__(self, delay_s: float = 0.0):
        self.client = OfflineClient(object())
        self.delay_s, self.seen = delay_s, []

    async def answer(self, url, body, request_id):
        self.seen.append(request_id)
        await asyncio.sleep(self.delay_s)
        if not isinstance(body.get("prompt"), str):
            return 400, {"error": {"message": "prompt: Field required", "type": "BadRequestError",
                                   "param": None, "code": 400}}
        return 200, {"id": f"cmpl-{request_id}", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": body["prompt"][::-1], "finish_reason": "length"}],
                     "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3,
                               "total_tokens": len(body["prompt"]) + 3,
                               "prompt_tokens_details": {"cached_tokens": 2}}}


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def batch_pump(store, loop, handlers=None, on_answered=None) -> OfflinePump:
    engine = OpenAIRequestEngine(handlers or Handlers(), loop, FAKE_FINGERPRINT, on_answered=on_answered)
    return OfflinePump(store, engine=None, run_cfg=RunConfig(max_inflight=4), output_dir=None,
                       model="fake-model", batch_engine=engine)


def create(store, content: bytes, window: str = "24h"):
    uploaded = store.create_file("batch", "in.jsonl", content)
    return lifecycle.create_batch(store, uploaded["id"], URL, window, "fake-model", FAKE_FINGERPRINT,
                                  metadata={"night": "1"}, served_urls=(URL,))


def run_batch(store, loop, batch_id: str):
    """The batch run to its end on a pump of its own; the batch as it ended."""
    pump = batch_pump(store, loop)
    pump.start()
    try:
        return wait_status(store, batch_id, "completed")
    finally:
        pump.stop()


def wait_status(store, batch_id: str, status: str, timeout_s: float = 30):
    return wait_for(lambda: (b := store.get_batch(batch_id)).status == status and b, f"batch {status}", timeout_s)


def file_lines(store, file_id):
    return [json.loads(line) for line in store.file_content(file_id).decode().splitlines()]


def test_a_batch_runs_on_the_pump_and_delivers_its_files_in_input_order(store, loop):
    batch = create(store, batch_file(7, bad=(3,)))
    assert batch.status == BatchStatus.VALIDATING and batch.num_lines == 7
    assert store.get_job(batch.job_id).spec.source == "batch"
    answered = []  # what /metrics counts per batch (`conserve_batch_tokens_total`)
    pump = batch_pump(store, loop, on_answered=lambda batch_id, usage: answered.append((batch_id, usage)))
    pump.start()
    try:
        done = wait_status(store, batch.id, "completed")
    finally:
        pump.stop()
    statements = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda conn, cursor, sql, *_: statements.append(sql))
    obj = lifecycle.describe(store, done)
    assert obj["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
    assert not [sql for sql in statements if "items" in sql]  # kept when it was finalized
    assert [obj[f"{s}_at"] is not None for s in ("in_progress", "finalizing", "completed")] == [True] * 3
    assert obj["metadata"] == {"night": "1"} and obj["model"] == "fake-model"
    outputs, errors = file_lines(store, done.output_file_id), file_lines(store, done.error_file_id)
    num_prompt = sum(len(f"prompt {i}") for i in (0, 1, 2, 4, 5, 6))  # the answered lines'
    assert obj["usage"] == {"input_tokens": num_prompt, "input_tokens_details": {"cached_tokens": 12},
                            "output_tokens": 18, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": num_prompt + 18}
    assert {b for b, _ in answered} == {batch.id} and len(answered) == 6  # the refused line: none
    assert sum(u["prompt_tokens"] for _, u in answered) == num_prompt
    assert [line["custom_id"] for line in outputs] == ["r0", "r1", "r2", "r4", "r5", "r6"]
    assert outputs[1]["response"]["body"]["choices"][0]["text"] == "1 tpmorp"
    assert outputs[1]["response"]["request_id"] in outputs[1]["response"]["body"]["id"]
    assert [e["custom_id"] for e in errors] == ["r3"] and errors[0]["response"]["status_code"] == 400
    assert store.get_job(batch.job_id).state == JobState.DONE


def test_expiry_delivers_what_finished_and_reports_the_rest_expired(store, loop):
    batch = create(store, batch_file(40), window="1h")
    pump = batch_pump(store, loop, Handlers(delay_s=0.05))
    pump.start()
    try:
        wait_for(lambda: store.batch_request_counts(store.get_batch(batch.id)).completed >= 4, "some lines")
        assert lifecycle.settle(store, now=batch.expires_at - 1) == []  # within its window
        assert lifecycle.settle(store, now=batch.expires_at + 1) == [batch.id]
        wait_for(lambda: store.get_job(batch.job_id).state == JobState.CANCELLED, "its job stopped")
    finally:
        pump.stop()
    expired = store.get_batch(batch.id)
    assert expired.status == BatchStatus.EXPIRED and expired.stamps["expired"] is not None
    delivered = file_lines(store, expired.output_file_id)
    unanswered = file_lines(store, expired.error_file_id)
    assert len(delivered) >= 4 and len(delivered) + len(unanswered) == 40
    assert expired.request_counts == RequestCounts(total=40, completed=len(delivered), failed=0)
    assert {(e["error"]["code"], e["response"]) for e in unanswered} == {("batch_expired", None)}
    order = [line["custom_id"] for line in delivered + unanswered]
    assert sorted(order, key=lambda c: int(c[1:])) == [f"r{i}" for i in range(40)]
    assert lifecycle.settle(store, now=batch.expires_at + 2) == []  # ended once


def test_a_cancelled_batch_stops_and_is_finalized_with_what_finished(store, loop):
    batch = create(store, batch_file(40))
    pump = batch_pump(store, loop, Handlers(delay_s=0.05))
    pump.start()
    try:
        wait_for(lambda: store.batch_request_counts(store.get_batch(batch.id)).completed >= 4, "some lines")
        cancelling = lifecycle.cancel_batch(store, batch.id)
        assert cancelling.status == BatchStatus.CANCELLING
        assert lifecycle.describe(store, cancelling)["usage"] is None  # totals once finalized
        assert lifecycle.cancel_batch(store, batch.id).status == BatchStatus.CANCELLING  # again: the same
        wait_for(lambda: store.get_job(batch.job_id).state == JobState.CANCELLED, "job cancelled")
        lifecycle.settle(store)
    finally:
        pump.stop()
    cancelled = store.get_batch(batch.id)
    assert cancelled.status == BatchStatus.CANCELLED
    delivered = file_lines(store, cancelled.output_file_id)
    unanswered = file_lines(store, cancelled.error_file_id)
    assert len(delivered) >= 4 and len(delivered) + len(unanswered) == 40
    assert {e["error"]["code"] for e in unanswered} == {"batch_cancelled"}
    assert not lifecycle.finalize(store, batch.id, BatchStatus.COMPLETED)  # a cancel stands


def test_an_ended_batch_cannot_be_cancelled(store, loop):
    batch = create(store, batch_file(2))
    run_batch(store, loop, batch.id)
    with pytest.raises(JobStateError, match="completed; it cannot be cancelled"):
        lifecycle.cancel_batch(store, batch.id)


def test_a_batch_left_finalizing_by_a_dead_replica_is_finalized_by_the_next_run(store, loop):
    batch = create(store, batch_file(3))
    store.move_batch(batch.id, BatchStatus.IN_PROGRESS, only_from=[BatchStatus.VALIDATING])
    engine = OpenAIRequestEngine(Handlers(), loop, FAKE_FINGERPRINT)
    from conserve_bench.jobs.runner import Runner
    Runner(store, engine, RunConfig()).run(batch.job_id, [])
    assert store.move_batch(batch.id, BatchStatus.FINALIZING, only_from=[BatchStatus.IN_PROGRESS])
    # the replica died here: the batch is finalizing, its job running with nobody on it
    pump = batch_pump(store, loop)
    pump.start()
    try:
        done = wait_status(store, batch.id, "completed")
    finally:
        pump.stop()
    assert [line["custom_id"] for line in file_lines(store, done.output_file_id)] == ["r0", "r1", "r2"]
    assert not lifecycle.finalize(store, batch.id, BatchStatus.COMPLETED)  # ended: left as it is


def test_the_sweeper_and_the_routes_share_a_running_batchs_count_and_keep_no_finished_one(store, loop, monkeypatch):
    """Every second the server's sweeper describes the newest 100 batches for /metrics, and
    each counted its lines' results: 1.35 s of CPU a sweep beside 20 finished 2,000-line
    batches and a running one of 20,000 (on a CPU host, the engine's CPU). A running batch's
    answer is reused as a polled one is, by the sweeper and the routes alike; a finished
    batch's counts are in its row, read afresh and never kept."""
    from conserve_bench.serve.batchapi import BatchAnswers, BatchSweeper
    from conserve_bench.serve.jobapi import PollCache

    batch = create(store, batch_file(3))
    clock, described, describe = [0.0], [], lifecycle.describe

    def counted(store_, b):
        described.append(b.status.value)
        clock[0] += 0.05  # 50 ms a count: kept 50 ms / POLL_SHARE
        return describe(store_, b)

    monkeypatch.setattr(lifecycle, "describe", counted)
    polls = PollCache(clock=lambda: clock[0])
    answers = BatchAnswers(store, polls)
    sweeper = BatchSweeper(store, answers)
    sweeper.sweep()
    sweeper.sweep()
    assert answers.describe(store.get_batch(batch.id))["request_counts"]["total"] == 3
    assert described == ["validating"]  # counted once for two sweeps and a retrieve
    run_batch(store, loop, batch.id)
    described.clear()
    sweeper.sweep()
    assert answers.describe(store.get_batch(batch.id))["request_counts"]["completed"] == 3
    assert described == ["completed", "completed"] and batch.id not in polls


def test_progress_says_whether_the_rest_fits_the_window(store):
    batch = create(store, batch_file(100))
    store.move_batch(batch.id, BatchStatus.IN_PROGRESS, only_from=[BatchStatus.VALIDATING])
    batch = store.get_batch(batch.id)
    started = batch.stamps["in_progress"]
    from conserve_bench.store import RequestCounts
    early = progress(RequestCounts(100, 0, 0), started + 10, batch)
    assert early["eta_s"] is None and early["finishes_in_window"] is None
    slow = progress(RequestCounts(100, 10, 0), started + 10_000, batch)  # 1 per 1000 s: 90,000 s to go
    assert slow["requests_per_s"] == 0.001 and slow["eta_s"] == 90_000 and slow["finishes_in_window"] is False
    fast = progress(RequestCounts(100, 50, 0), started + 50, batch)
    assert fast["eta_s"] == 50 and fast["finishes_in_window"] is True


def test_a_batch_of_an_endpoint_the_model_does_not_serve_or_a_wrong_file_is_refused(store):
    uploaded = store.create_file("batch", "in.jsonl", batch_file(2))
    with pytest.raises(InvalidRequestError, match="does not serve /v1/embeddings"):
        lifecycle.create_batch(store, uploaded["id"], "/v1/embeddings", "24h", "m", FAKE_FINGERPRINT,
                               served_urls=(URL,))
    output = store.create_file("batch_output", "out.jsonl", batch_file(2))
    with pytest.raises(InvalidRequestError, match="not 'batch'"):
        lifecycle.create_batch(store, output["id"], URL, "24h", "m", FAKE_FINGERPRINT)
    with pytest.raises(InvalidRequestError, match="metadata"):
        lifecycle.create_batch(store, uploaded["id"], URL, "24h", "m", FAKE_FINGERPRINT,
                               metadata={str(i): "v" for i in range(17)})
    assert store.list_batches() == [] and store.num_jobs() == 0  # nothing written


# -- the HTTP API, through the official client ---------------------------------------------------


@pytest.fixture
def openai_client(store):
    openai = pytest.importorskip("openai")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from conserve_bench.serve.batchapi import install_batch_api

    app = FastAPI()
    install_batch_api(app, store, "fake-model", FAKE_FINGERPRINT, (URL, "/v1/chat/completions"))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=TestClient(app),
                         max_retries=0)


def test_the_openai_client_runs_a_batch_end_to_end(store, loop, openai_client, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(batch_file(5, bad=(1,)))
    uploaded = openai_client.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size and uploaded.filename == "requests.jsonl"
    assert openai_client.files.retrieve(uploaded.id).purpose == "batch"
    batch = openai_client.batches.create(input_file_id=uploaded.id, endpoint=URL, completion_window="24h",
                                         metadata={"team": "evals"})
    assert batch.status == "validating" and batch.request_counts.total == 5
    pump = batch_pump(store, loop)
    pump.start()
    try:
        done = wait_for(lambda: (b := openai_client.batches.retrieve(batch.id)).status == "completed" and b,
                        "completed")
    finally:
        pump.stop()
    assert done.request_counts.completed == 4 and done.request_counts.failed == 1
    assert done.metadata == {"team": "evals"} and done.conserve["eta_s"] == 0.0
    outputs = [json.loads(line) for line in openai_client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in outputs] == ["r0", "r2", "r3", "r4"]
    errors = openai_client.files.content(done.error_file_id).text
    assert '"status_code": 400' in errors
    assert openai_client.batches.list().data[0].id == batch.id
    assert {f.id for f in openai_client.files.list().data} >= {uploaded.id, done.output_file_id}
    assert openai_client.files.delete(uploaded.id).deleted


def test_the_openai_client_sees_openai_errors(store, openai_client, tmp_path):
    import openai

    path = tmp_path / "bad.jsonl"
    path.write_bytes(f"{request_line('a')}\n{{oops\n".encode())
    uploaded = openai_client.files.create(file=path.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.batches.create(input_file_id=uploaded.id, endpoint=URL, completion_window="24h")
    assert refused.value.body["line"] == 2 and "line 2: not valid JSON" in refused.value.body["message"]
    assert refused.value.body["code"] == "invalid_batch_file"
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        openai_client.batches.create(input_file_id=uploaded.id, endpoint=URL, completion_window="1d")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        openai_client.files.create(file=path.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        openai_client.files.content("file-nope")
    with pytest.raises(openai.BadRequestError, match="does not serve"):
        openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                     completion_window="24h")
    assert store.list_batches() == []


def test_batches_list_in_pages(store, openai_client):
    ids = [create(store, batch_file(1)).id for _ in range(5)]
    time.sleep(0.01)
    first = openai_client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    assert [b.id for b in openai_client.batches.list(limit=10).data] == ids[::-1]
    assert [b.id for b in openai_client.batches.list(limit=2, after=first.data[-1].id).data] == ids[::-1][2:4]


# -- `conserve-bench batch --server`, against the API on a real HTTP server ----------------------


@pytest.fixture
def batch_server(store, loop):
    """The batch API on uvicorn (a thread of its own) over `store`, its lines run by a pump on
    stand-in handlers; yields the URL."""
    import uvicorn
    from fastapi import FastAPI

    from conserve_bench.serve.batchapi import install_batch_api
    from conserve_bench.store.pgcluster import free_port

    app = FastAPI()
    install_batch_api(app, store, "fake-model", FAKE_FINGERPRINT, (URL,))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the test server")
    pump = batch_pump(store, loop)
    pump.start()
    yield f"http://127.0.0.1:{server.config.port}"
    pump.stop()
    server.should_exit = True
    thread.join(10)


def test_the_batch_command_runs_a_file_on_a_server_and_writes_run_batch_s_layout(batch_server, run_cli, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(batch_file(5, bad=(2,)))
    code, out, err = run_cli("batch", path, "--server", batch_server)
    assert code == 0, err
    written = [json.loads(line) for line in (tmp_path / "requests.output.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in written] == [f"r{i}" for i in range(5)]  # input order, errors too
    assert written[2]["response"]["status_code"] == 400
    assert "completed: 4 of 5 answered, 1 failed" in out
    batch_id = next(word for word in err.split() if word.startswith("batch_"))

    code, out, err = run_cli("batch", "--batch-id", batch_id, "--server", batch_server,
                             "-o", tmp_path / "again.jsonl", "--errors", tmp_path / "errors.jsonl")
    assert code == 0, err
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "again.jsonl").read_text().splitlines()] == [
        "r0", "r1", "r3", "r4"]
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "errors.jsonl").read_text().splitlines()] == ["r2"]


@pytest.mark.parametrize("args, words", [
    (("missing.jsonl", "--server", "http://127.0.0.1:9"), "cannot read"),
    (("--server", "http://127.0.0.1:9"), "give an input file, or --batch-id"),
    (("bad.jsonl", "--server", "http://127.0.0.1:9"), "line 1 is not a JSON object"),
])
def test_the_batch_command_refuses_bad_input_in_one_line(run_cli, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    code, out, err = run_cli("batch", *args)
    assert code == 2 and words in err and "Traceback" not in err
