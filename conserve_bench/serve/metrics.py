"""Prometheus metrics of the co-located server, added to vLLM's own `/metrics`.

Online: TTFT and TBT histograms measured at the HTTP layer (time to the first streamed
chunk, gaps between chunks) and SLO-attainment counters against the configured targets.
Offline: tokens and items counters (Prometheus derives the rates) and per-job progress.
This module only observes; it never changes what the server does.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

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


class OnlineMetrics:
    def __init__(self, ttft_slo_s: float, tbt_slo_s: float):
        self.ttft_slo_s, self.tbt_slo_s = ttft_slo_s, tbt_slo_s
        self._last_done: dict[str, int] = {}

    def start_online(self) -> "_RequestTimer":
        return _RequestTimer(self)

    def observe_ttft(self, seconds: float) -> None:
        _TTFT.observe(seconds)
        _SLO.labels("ttft", "met" if seconds <= self.ttft_slo_s else "missed").inc()

    def observe_tbt(self, seconds: float) -> None:
        _TBT.observe(seconds)
        _SLO.labels("tbt", "met" if seconds <= self.tbt_slo_s else "missed").inc()

    def offline_tokens(self, num_tokens: int) -> None:
        _OFFLINE_TOKENS.inc(num_tokens)

    def job_progress(self, job_id: str, num_done: int, num_total: int) -> None:
        _OFFLINE_ITEMS.inc(max(0, num_done - self._last_done.get(job_id, num_done)))
        self._last_done[job_id] = num_done
        _JOB_DONE.labels(job_id).set(num_done)
        _JOB_TOTAL.labels(job_id).set(num_total)


class _RequestTimer:
    """Times one online response: first body chunk -> TTFT, later chunks -> TBT."""

    def __init__(self, metrics: OnlineMetrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.num_chunks = 0

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.num_chunks == 0:
            self.metrics.observe_ttft(now - self.start)
        else:
            self.metrics.observe_tbt(now - self.last)
        self.num_chunks += 1
        self.last = now
