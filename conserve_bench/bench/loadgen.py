"""The online side of `bench`: streamed completions sent on schedule, timed on the client.

Each request is a token-id prompt of exactly the workload's context tokens, with
`max_tokens` = its generated tokens and `ignore_eos`, streamed; TTFT and every gap between
tokens are taken when the chunks arrive here. Also samples the server's offline counters
from `/metrics`. It only sends and observes; building the report is `bench.summary`'s job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx

from conserve_bench.bench.summary import CounterSample, OnlineRecord
from conserve_bench.bench.workload import OnlineRequest, prompt_token_ids

OFFLINE_COUNTERS = {"conserve_offline_tokens_total": "tokens", "conserve_offline_items_total": "items"}


class OnlineClient:
    def __init__(self, base_url: str, model: str, seed: int, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.seed = model, seed
        # NOTE: no pool limit and no read timeout: a slow stream is a measurement, not an error.
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                      timeout=httpx.Timeout(30.0, read=None))

    async def close(self) -> None:
        await self.http.aclose()

    async def stream(self, index: int, request: OnlineRequest, t0: float) -> OnlineRecord:
        """Send one request now; its times are relative to `t0` (a `perf_counter` value)."""
        body = {"model": self.model, "prompt": prompt_token_ids(request.context_tokens, self.seed, index),
                "max_tokens": request.generated_tokens, "min_tokens": request.generated_tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True}
        start = last = time.perf_counter()
        ttft, gaps = None, []
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return _failed(index, request, f"HTTP {response.status_code}: {response.text[:200]}")
                async for num_tokens in _token_chunks(response):
                    now = time.perf_counter()
                    # NOTE: a chunk may carry several tokens (the server merged steps); the first
                    # waited since the last chunk, the others arrived with it.
                    if ttft is None:
                        ttft, num_tokens = now - start, num_tokens - 1
                    else:
                        gaps.append(now - last)
                        num_tokens -= 1
                    gaps += [0.0] * num_tokens
                    last = now
        except (httpx.HTTPError, ValueError) as e:
            return _failed(index, request, f"{type(e).__name__}: {e}")
        return OnlineRecord(index, request.arrival_s, request.context_tokens, request.generated_tokens,
                            ttft, tuple(gaps), last - t0)

    async def replay(self, requests: list[OnlineRequest], drain_timeout_s: float,
                     on_done: Callable[[OnlineRecord], None] = lambda r: None) -> list[OnlineRecord]:
        """Send each request at its arrival time (t=0: now); wait for the last at most
        `drain_timeout_s` after the last arrival; requests still open then count as failed."""
        t0 = time.perf_counter()

        async def send(index: int, request: OnlineRequest) -> OnlineRecord:
            await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
            record = await self.stream(index, request, t0)
            on_done(record)
            return record

        tasks = [asyncio.create_task(send(i, r)) for i, r in enumerate(requests)]
        last_arrival = max((r.arrival_s for r in requests), default=0.0)
        deadline = t0 + last_arrival + drain_timeout_s
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        late = [task for task in tasks if not task.done()]
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)  # their streams close here
        return [_outcome(task, index, request) for index, (task, request) in enumerate(zip(tasks, requests))]

    async def closed_loop(self, requests: list[OnlineRequest], concurrency: int) -> tuple[list[OnlineRecord], float]:
        """Send all requests keeping `concurrency` in flight; (records, wall seconds)."""
        t0 = time.perf_counter()
        pending = list(enumerate(requests))
        records: list[OnlineRecord] = []

        async def send_in_turn():
            while pending:
                index, request = pending.pop(0)
                records.append(await self.stream(index, request, t0))

        await asyncio.gather(*(send_in_turn() for _ in range(concurrency)))
        return sorted(records, key=lambda r: r.index), time.perf_counter() - t0

    async def offline_counters(self, t0: float) -> CounterSample:
        response = await self.http.get("/metrics")
        response.raise_for_status()
        return CounterSample(time.perf_counter() - t0, **parse_counters(response.text))


def parse_counters(metrics_text: str) -> dict[str, float]:
    """The offline counters from Prometheus text (0 until the server first counts)."""
    values = dict.fromkeys(OFFLINE_COUNTERS.values(), 0.0)
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name in OFFLINE_COUNTERS:
            values[OFFLINE_COUNTERS[name]] = float(value)
    return values


async def _token_chunks(response):
    """The number of generated tokens in each server-sent event of a completion stream."""
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        if "error" in chunk:
            raise ValueError(chunk["error"].get("message", "stream error"))
        num_tokens = sum(len(c.get("token_ids") or ()) for c in chunk.get("choices", ()))
        if num_tokens:
            yield num_tokens


def _outcome(task: asyncio.Task, index: int, request: OnlineRequest) -> OnlineRecord:
    if task.cancelled():
        return _failed(index, request, "drain timeout")
    if task.exception() is not None:
        return _failed(index, request, f"{type(task.exception()).__name__}: {task.exception()}")
    return task.result()


def _failed(index: int, request: OnlineRequest, error: str) -> OnlineRecord:
    return OnlineRecord(index, request.arrival_s, request.context_tokens, request.generated_tokens,
                        error=error)
