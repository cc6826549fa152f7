"""Where `ConserveLM`'s requests are computed: in this process, or on a `conserve-bench serve`.

Both backends take one lm-eval request kind with its arguments as plain data and return the
results in request order. `LocalBackend` keys each request by content hash, attaches it to a
job in the store and lets the runner compute only items without a stored result.
`RemoteBackend` sends the requests as jobs to a server (which keys them with its own model
fingerprint, and records the chat template that rendered them), polls them and fetches
results by key. Neither computes a result itself.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from conserve_bench.store import keyed_items
from conserve_bench.errors import JobStateError
from conserve_bench.output import out
from conserve_bench.store.states import JobState

REQUESTS_PER_JOB = 1000  # a server job per this many requests keeps each POST small
# NOTE: and under this many bytes of JSON: the server's one body limit (`--max-request-bytes`,
# 1 MiB by default) holds for this route too, with room for the envelope.
MAX_POST_BYTES = 768 << 10
POLL_S = 0.5


@dataclass
class RunCounts:
    """What one kind of requests cost: how many were unique, and how many were already stored."""

    kind: str
    num_requests: int
    num_reused: int

    def describe(self) -> str:
        return (f"conserve: {self.kind}: {self.num_requests} requests, {self.num_reused} reused "
                f"from the store, {self.num_requests - self.num_reused} computed")


class LocalBackend:
    """Requests -> work items of `job_id` -> the runner (and its engine) in this process."""

    def __init__(self, store, runner, job_id: str, fingerprint: str,
                 on_kind: Callable[[str, int], None] | None = None, show_progress: bool = False):
        self.store, self.runner, self.job_id, self.fingerprint = store, runner, job_id, fingerprint
        self.on_kind = on_kind or (lambda kind, num_items: None)
        self.show_progress = show_progress

    def run(self, kind: str, args: list[Any]) -> tuple[list[Any], RunCounts]:
        keys, items = keyed_items([(kind, a) for a in args], self.fingerprint)
        self.store.add_items(self.job_id, items)
        self.on_kind(kind, len(items))
        item_keys = [item.key for item in items]
        counts = RunCounts(kind, len(items), len(self.store.results_for(item_keys)))
        if self.show_progress:
            with progress_bar(kind, counts.num_requests, counts.num_reused) as advance:
                self.runner.on_progress = advance
                self.runner.on_tokens = lambda num_tokens: advance(0, num_tokens)
                results = self.runner.run(self.job_id, item_keys, kind)
        else:
            results = self.runner.run(self.job_id, item_keys, kind)
        return [results[k] for k in keys], counts


class RemoteBackend:
    """Requests -> jobs on a running `conserve-bench serve` (`POST /v1/jobs/requests`)."""

    def __init__(self, client, poll_s: float = POLL_S, show_progress: bool = True):
        self.client, self.poll_s, self.show_progress = client, poll_s, show_progress
        self.chat_template_sha256: str | None = None  # recorded with each job, when set

    def run(self, kind: str, args: list[Any]) -> tuple[list[Any], RunCounts]:
        requests = [{"kind": kind, "args": a} for a in args]
        jobs = [self.client.submit_requests(chunk, chat_template_sha256=self.chat_template_sha256)
                for chunk in post_sized(requests)]
        keys = [k for job in jobs for k in job["keys"]]
        counts = RunCounts(kind, sum(j["total"] for j in jobs), sum(j["done"] for j in jobs))
        with progress_bar(kind, counts.num_requests, counts.num_reused,
                          disable=not self.show_progress) as advance:
            self._wait(jobs, advance)
        results: dict[str, Any] = {}
        for job in jobs:
            results.update(self.client.item_results(job["id"]))
        return [results[k] for k in keys], counts

    def _wait(self, jobs: list[dict[str, Any]], advance: Callable[[int], None]) -> None:
        """Poll until every job is done; advance the bar by what each poll newly finds done."""
        num_done = {job["id"]: job["done"] for job in jobs}
        pending = [job["id"] for job in jobs if job["state"] != JobState.DONE]
        while pending:
            for job_id in list(pending):
                status = self.client.status(job_id)
                if status["state"] in (JobState.FAILED, JobState.CANCELLED):
                    raise JobStateError(f"server job {job_id} ended {status['state']}: "
                                        f"{status.get('error') or ''}".strip())
                advance(status["done"] - num_done[job_id])
                num_done[job_id] = status["done"]
                if status["state"] == JobState.DONE:
                    pending.remove(job_id)
            if pending:
                time.sleep(self.poll_s)


def post_sized(requests: list[dict[str, Any]], max_items: int = REQUESTS_PER_JOB,
               max_bytes: int = MAX_POST_BYTES) -> Iterator[list[dict[str, Any]]]:
    """`requests` in order, in runs of at most `max_items` and `max_bytes` of JSON each (a
    single request larger than that goes alone; the server says if it is too large)."""
    chunk: list[dict[str, Any]] = []
    num_bytes = 0
    for request in requests:
        size = len(json.dumps(request)) + 2
        if chunk and (len(chunk) == max_items or num_bytes + size > max_bytes):
            yield chunk
            chunk, num_bytes = [], 0
        chunk.append(request)
        num_bytes += size
    if chunk:
        yield chunk


@contextlib.contextmanager
def progress_bar(kind: str, total: int, done: int,
                 disable: bool = False) -> Iterator[Callable[..., None]]:
    """The CLI's progress display for one request kind (a live bar on a terminal, a plain
    line every few seconds in a log: `output.Output.progress`); yields
    `advance(num_items, num_new_tokens=0)`."""
    with out.progress(disable=disable) as progress:
        task = progress.add_task(f"conserve {kind}", total=total, completed=done, tokens=0)
        num_done, num_tokens = done, 0

        def advance(num_items: int, num_new_tokens: int = 0) -> None:
            nonlocal num_done, num_tokens
            num_done, num_tokens = num_done + num_items, num_tokens + num_new_tokens
            progress.update(task, completed=num_done, tokens=num_tokens)

        yield advance
