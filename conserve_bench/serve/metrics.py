"""Prometheus metrics of the co-located server, added to vLLM's own `/metrics`.

Online: TTFT and TBT histograms measured at the HTTP layer (time to the first streamed
chunk, gaps between chunks) and SLO-attainment counters against the configured targets; only
of requests the guard admitted (key, JSON body) and answered with a status below 400.
Offline: tokens and items counters (Prometheus derives the rates) and per-job progress.
The API process itself: its event loop's stalls and the collector's pauses (`ProcessWatch`),
the time an online request arriving then waits before vLLM even sees it. Latency model: the
live refit's and the profile's errors on the newest live steps, read from
the file the engine's scheduler writes (`RefitWatcher`, which also stores the refit under the
profile's key). KV checkpoints: the host pool's use and what resumes loaded, from the file the
engine's connector writes (`CheckpointWatcher`). This module only observes; it never changes
what the server does.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from conserve_bench.vllm_plugin.overrides import read_state
from conserve_bench.sched.refit import RefitStatus

if TYPE_CHECKING:
    from conserve_bench.profiling.profiles import ProfileKey
    from conserve_bench.store import Store

BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STALL_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0)

_TTFT = Histogram("conserve_online_ttft_seconds", "Online time to first token (HTTP).",
                  buckets=BUCKETS_S)
_TBT = Histogram("conserve_online_tbt_seconds", "Online time between tokens (HTTP).",
                 buckets=BUCKETS_S)
_SLO = Counter("conserve_online_slo_total", "Online latency samples by SLO outcome.",
               ["metric", "outcome"])
_OFFLINE_TOKENS = Counter("conserve_offline_tokens_total", "Tokens processed for offline jobs.")
_OFFLINE_ITEMS = Counter("conserve_offline_items_total", "Offline work items committed.")
_JOB_DONE = Gauge("conserve_job_items_done", "Finished items of a job.", ["job"])
_JOB_TOTAL = Gauge("conserve_job_items_total", "Items of a job.", ["job"])
_BATCH_REQUESTS = Gauge("conserve_batch_requests", "Requests of an OpenAI batch, by outcome so far "
                        "(total, completed, failed).", ["batch", "state"])
_BATCH_TOKENS = Counter("conserve_batch_tokens_total", "Tokens of the requests of an OpenAI batch this "
                        "server answered (input: prompt; output: generated).", ["batch", "kind"])
_BATCH_ETA = Gauge("conserve_batch_eta_seconds", "Seconds an OpenAI batch's remaining requests "
                   "need at its measured rate (NaN before one is measured).", ["batch"])
_MODEL_ERROR = Gauge("conserve_latency_model_rel_error",
                     "Relative step-time error on the newest live steps, per latency model.",
                     ["model", "quantile"])
_REFIT_ADOPTED = Gauge("conserve_latency_model_refit_adopted",
                       "1 while the live refit plans, 0 while the profile's model does.")
_REFITS = Gauge("conserve_latency_model_refits", "Live refits since the engine started.")
_SIZE_CORRECTION = Gauge("conserve_latency_model_size_correction",
                         "Measured over predicted step time of a size class, by which the planner "
                         "scales the linear model's prediction for it (1: uncorrected).", ["size_class"])
_POOL_BYTES = Gauge("conserve_kv_checkpoint_bytes", "The KV checkpoint host pool, in bytes.",
                    ["state"])
_POOL_REQUESTS = Gauge("conserve_kv_checkpoint_requests", "Offline requests tracked by the pool.")
_POOL_BLOCKS = Gauge("conserve_kv_checkpoint_blocks",
                     "KV blocks saved, loaded and evicted since the engine started.", ["kind"])
_RESUMES = Gauge("conserve_kv_checkpoint_resumes", "Preempted offline requests resumed.")
_RESUME_TOKENS = Gauge("conserve_kv_checkpoint_resume_tokens",
                       "Tokens preempted requests had computed: loaded or computed again.",
                       ["kind"])
_LOOP_STALL = Histogram("conserve_api_loop_stall_seconds",
                        "How late the API server's event loop woke from a short sleep: its stalls "
                        "(the collector, Python work holding the GIL), which an online request "
                        "arriving then waits out before the engine sees it.", buckets=STALL_BUCKETS_S)
_GC_PAUSE = Histogram("conserve_api_gc_pause_seconds",
                      "The garbage collector's passes in the API server's process, by generation.",
                      ["generation"], buckets=STALL_BUCKETS_S)


def batch_progress(batch_id: str, counts: dict[str, int], eta_s: float | None) -> None:
    """Export one batch's request counts and ETA."""
    for state, value in counts.items():
        _BATCH_REQUESTS.labels(batch_id, state).set(value)
    _BATCH_ETA.labels(batch_id).set(float("nan") if eta_s is None else eta_s)


class OnlineMetrics:
    def __init__(self, ttft_slo_s: float, tbt_slo_s: float):
        self.ttft_slo_s, self.tbt_slo_s = ttft_slo_s, tbt_slo_s
        self._last_done: dict[str, int] = {}

    def start_online(self, streaming: bool = True) -> "_RequestTimer":
        """A timer for one admitted online request; `streaming`: its response comes in chunks."""
        return _RequestTimer(self, streaming)

    def observe_ttft(self, seconds: float) -> None:
        _TTFT.observe(seconds)
        _SLO.labels("ttft", "met" if seconds <= self.ttft_slo_s else "missed").inc()

    def observe_tbt(self, seconds: float) -> None:
        _TBT.observe(seconds)
        _SLO.labels("tbt", "met" if seconds <= self.tbt_slo_s else "missed").inc()

    def offline_tokens(self, num_tokens: int) -> None:
        _OFFLINE_TOKENS.inc(num_tokens)

    def batch_tokens(self, batch_id: str, usage: dict) -> None:
        """A batch line answered here (200): its prompt and generated tokens."""
        _BATCH_TOKENS.labels(batch_id, "input").inc(usage.get("prompt_tokens") or 0)
        _BATCH_TOKENS.labels(batch_id, "output").inc(usage.get("completion_tokens") or 0)

    def job_progress(self, job_id: str, num_done: int, num_total: int) -> None:
        _OFFLINE_ITEMS.inc(max(0, num_done - self._last_done.get(job_id, num_done)))
        self._last_done[job_id] = num_done
        _JOB_DONE.labels(job_id).set(num_done)
        _JOB_TOTAL.labels(job_id).set(num_total)


class _RequestTimer:
    """Times one online response from its ASGI messages: first streamed chunk -> TTFT, later
    chunks -> TBT. NOTE: only a streamed response shows TTFT and TBT (a plain one is one
    chunk), and only one whose status is below 400: errors would skew the SLO counters."""

    def __init__(self, metrics: OnlineMetrics, streaming: bool = True):
        self.metrics, self.streaming = metrics, streaming
        self.start = self.last = time.perf_counter()
        self.num_chunks = 0
        self.ok = False  # until the response starts with a status below 400

    def observe(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.ok = message["status"] < 400
        elif (message["type"] == "http.response.body" and message.get("more_body")
              and self.ok and self.streaming):
            self.chunk()

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.num_chunks == 0:
            self.metrics.observe_ttft(now - self.start)
        else:
            self.metrics.observe_tbt(now - self.last)
        self.num_chunks += 1
        self.last = now


async def poll_every(every_s: float, poll) -> None:
    """Call `poll()` every `every_s` seconds until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        poll()


class RefitWatcher:
    """Reads the live refit the engine-core process writes (a JSON file: vLLM gives the
    scheduler no channel to the API server), sets the latency-model gauges, and stores each
    new refit under the profile's key (`profile --show` prints it)."""

    def __init__(self, path: str, store: Store, key: ProfileKey | None):
        self.path, self.store, self.key = path, store, key
        self._seen_at: float | None = None

    async def run(self, every_s: float) -> None:
        await poll_every(every_s, self.poll)

    def poll(self) -> RefitStatus | None:
        """The newest refit, if the engine wrote one since the last poll."""
        data = read_state(self.path)
        if data is None:
            return None
        if data.get("at") == self._seen_at:
            return None
        self._seen_at = data.get("at")
        status = RefitStatus.from_dict(data)
        self.show(status)
        if self.key is not None:
            from conserve_bench.profiling.profiles import save_refit

            save_refit(self.store, self.key, status)
        return status

    @staticmethod
    def show(status: RefitStatus) -> None:
        for model, error in (("profile", status.profile_error), ("refit", status.refit_error)):
            for quantile, value in (("0.5", error.median_rel), ("0.9", error.p90_rel),
                                    ("1", error.max_rel)):
                _MODEL_ERROR.labels(model, quantile).set(value)
        _REFIT_ADOPTED.set(1 if status.adopted else 0)
        _REFITS.set(status.num_refits)
        for size_class, correction in status.corrections.items():
            _SIZE_CORRECTION.labels(size_class).set(correction)


class CheckpointWatcher:
    """Reads the KV checkpoint pool's state the engine's connector writes (a JSON file, like
    the refit) and sets the `conserve_kv_checkpoint_*` gauges."""

    def __init__(self, path: str):
        self.path = path

    async def run(self, every_s: float) -> None:
        await poll_every(every_s, self.poll)

    def poll(self) -> dict | None:
        state = read_state(self.path)
        if state is None:
            return None
        _POOL_BYTES.labels("capacity").set(state["pool_bytes"])
        _POOL_BYTES.labels("used").set(state["used_bytes"])
        _POOL_REQUESTS.set(state["requests"])
        for kind in ("saved", "loaded", "evicted"):
            _POOL_BLOCKS.labels(kind).set(state[f"{kind}_blocks"])
        _RESUMES.set(state["resumes"])
        for kind in ("loaded", "recomputed"):
            _RESUME_TOKENS.labels(kind).set(state[f"{kind}_tokens"])
        return state


class ProcessWatch:
    """The API process's own stalls: the event loop woken every `every_s` observes how late it
    woke (`conserve_api_loop_stall_seconds`), and every pass of the garbage collector is timed
    (`conserve_api_gc_pause_seconds`). NOTE: the collector's callback only appends to a deque
    (atomic under the GIL): the histograms take a lock that the interrupted thread may hold;
    the loop observes the pauses at its next wake."""

    def __init__(self):
        self._pauses: collections.deque[tuple[int, float]] = collections.deque()
        self._started: float | None = None

    def _on_collect(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))
            self._started = None

    async def run(self, every_s: float = 0.01) -> None:
        gc.callbacks.append(self._on_collect)
        try:
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(every_s)
                _LOOP_STALL.observe(max(0.0, time.perf_counter() - t0 - every_s))
                while self._pauses:
                    generation, seconds = self._pauses.popleft()
                    _GC_PAUSE.labels(str(generation)).observe(seconds)
        finally:
            gc.callbacks.remove(self._on_collect)
