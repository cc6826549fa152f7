"""The job API's HTTP client against a server that is down, restarting or failing.

503 (the server's store is out) and refused connections are waited out with backoff up to
`max_wait_s`, then `EngineUnavailableError` (exit 3); a request the server may have acted on is
sent again only if that is harmless; 4xx are the server's one line (exit 2). Server-side paths
and URLs the client did not send never reach its messages. httpx's `MockTransport` plays the
server, and a real listener on a loopback port plays one that comes back up.
"""

from __future__ import annotations

import threading
import time
from http.server import ThreadingHTTPServer

import httpx
import pytest

from conserve_bench.errors import EngineUnavailableError, JobNotFoundError, JobStateError
from conserve_bench.serve import client as client_module
from conserve_bench.serve.client import JobClient, ServerError, redact
from conserve_bench.store.pgcluster import free_port
from .conftest import json_handler

URL = "http://jobs.test"
STORE_OUT = {"error": {"type": "StoreUnavailableError",
                       "message": "database postgresql://ci:***@db.internal:5432/jobs unreachable for 30 s: "
                                  "connection refused"}}
JOB = {"id": "abc", "state": "running", "done": 1, "total": 4}


def scripted(*answers):
    """A transport answering each request with the next of `answers` (the last repeats):
    (status, body) or an exception to raise. Records the requests."""
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = answers[min(len(requests), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handle), requests


def test_waits_through_a_store_outage_then_succeeds():
    transport, requests = scripted((503, STORE_OUT), (503, STORE_OUT), (200, JOB))
    started = time.monotonic()
    assert JobClient(URL, max_wait_s=30, transport=transport).status("abc") == JOB
    assert len(requests) == 3
    assert time.monotonic() - started >= 3 * client_module.FIRST_RETRY_S  # backed off: 0.25 + 0.5


def test_gives_up_after_the_bound_as_infrastructure_without_the_servers_url():
    transport, requests = scripted((503, STORE_OUT))
    started = time.monotonic()
    with pytest.raises(EngineUnavailableError) as raised:
        JobClient(URL, max_wait_s=1.0, transport=transport).status("abc")
    assert 1.0 <= time.monotonic() - started < 3
    assert raised.value.exit_code == 3 and len(requests) >= 3
    message = str(raised.value)
    assert message.startswith(f"{URL} answered 503: database <server URL> unreachable for 30 s")
    assert "db.internal" not in message and message.endswith("(still so after 1 s of retrying)")


def test_a_stop_ends_the_wait_early():
    transport, _ = scripted((503, STORE_OUT))
    started = time.monotonic()
    with pytest.raises(EngineUnavailableError, match="stopped waiting"):
        JobClient(URL, max_wait_s=60, should_stop=lambda: time.monotonic() - started > 0.5,
                  transport=transport).status("abc")
    assert time.monotonic() - started < 2


def test_a_post_the_server_may_have_acted_on_is_sent_once():
    """A lost answer to a job without a run key: sending it again could queue a second job."""
    for failure in (httpx.ReadTimeout("timed out"), (502, {})):
        transport, requests = scripted(failure, (201, JOB))
        with pytest.raises(EngineUnavailableError):
            JobClient(URL, max_wait_s=30, transport=transport).submit(["mmlu_anatomy"])
        assert len(requests) == 1
        transport, requests = scripted(failure, (200, JOB))  # a run key makes it harmless
        assert JobClient(URL, max_wait_s=30, transport=transport).submit(["mmlu_anatomy"], run_key="k") == JOB
        assert len(requests) == 2
    transport, requests = scripted((503, STORE_OUT), (201, JOB))  # 503: the server did nothing
    assert JobClient(URL, max_wait_s=30, transport=transport).submit(["mmlu_anatomy"]) == JOB


def test_client_errors_are_the_servers_one_line_and_not_retried():
    data_dir = "/home/me/mmlu"
    transport, requests = scripted((400, {"error": {"message": f"data_dir {data_dir}: no test folder in "
                                                               f"{data_dir}/test (server data at /srv/data)\nmore"}}))
    with pytest.raises(ServerError) as raised:
        JobClient(URL, max_wait_s=30, transport=transport).submit(["mmlu_anatomy"], data_dir=data_dir)
    assert raised.value.exit_code == 2 and len(requests) == 1
    assert str(raised.value) == f"data_dir {data_dir}: no test folder in {data_dir}/test (server data at <server path>)"
    for status, cls in ((404, JobNotFoundError), (409, JobStateError)):
        transport, _ = scripted((status, {"error": {"message": "job abc: no"}}))
        with pytest.raises(cls, match="^job abc: no$"):
            JobClient(URL, transport=transport).status("abc")
    transport, _ = scripted((500, {"error": {"message": "boom at /srv/app/x.py"}}))
    with pytest.raises(EngineUnavailableError, match="^500 from the server: boom at <server path>$"):
        JobClient(URL, transport=transport).status("abc")


def test_redact_keeps_what_was_sent_only():
    assert redact("see /srv/x and sqlite:////var/db.sqlite") == "see <server path> and <server URL>"
    sent = ["http://127.0.0.1:8000", "/data/mmlu"]
    message = "cannot reach http://127.0.0.1:8000: acc/none 3/4 at /data/mmlu/test, not /data/mmlu2"
    assert redact(message, sent) == "cannot reach http://127.0.0.1:8000: acc/none 3/4 at /data/mmlu/test, not <server path>"


def test_a_server_url_without_http_is_a_usage_error():
    with pytest.raises(ServerError, match="not an http:// or https:// URL") as raised:
        JobClient("127.0.0.1:8000")
    assert raised.value.exit_code == 2


# -- a real port: refused, then a server comes up -------------------------------------------


_Models = json_handler(200, {"data": [{"id": "smollm2-135m"}]})


def test_waits_for_a_server_that_comes_back_up():
    """Connection refused (a `serve` restarting, as a supervisor restarts it), then it answers."""
    port, up = free_port(), threading.Event()
    servers: list[ThreadingHTTPServer] = []

    def start_later():
        time.sleep(1.0)
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), _Models))
        up.set()
        servers[0].serve_forever()

    threading.Thread(target=start_later, daemon=True).start()
    try:
        assert JobClient(f"http://127.0.0.1:{port}", max_wait_s=30).model() == "smollm2-135m"
    finally:
        assert up.wait(10)
        servers[0].shutdown()
        servers[0].server_close()


def test_a_server_that_stays_down_is_infrastructure_after_the_bound():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(EngineUnavailableError) as raised:
        JobClient(url, max_wait_s=0.8).status("abc")
    assert 0.8 <= time.monotonic() - started < 3
    assert str(raised.value).startswith(f"cannot reach {url}: ")
    assert str(raised.value).endswith("s of retrying)")
    with pytest.raises(EngineUnavailableError) as at_once:
        JobClient(url, max_wait_s=0).status("abc")
    assert "retrying" not in str(at_once.value)
