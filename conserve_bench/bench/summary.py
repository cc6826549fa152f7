"""The `bench` report: per-request records and counter samples in, `report.json` out.

Pure functions over plain data (no HTTP, no clock, no files), so that every number of the
report can be checked against its parts. Latencies are measured on the client side; the
offline side is read from the server's `conserve_offline_*_total` counters over the window.

SLO attainment: the share of online requests that completed all their tokens with a TTFT
within the TTFT SLO and every gap between tokens within the TBT SLO. The slack: what the
engine could harvest beside online work alone, offline-only tokens/s x the share of the window
`online-only`'s engine was idle (from its step log). Conserve's goal (`GOAL`): attainment within
5% of online-only's while harvesting what the slack allows. Also from the server's step log:
layer-wise preemptions (steps abandoned at a safepoint) and how long online requests queued in
the server before a step first scheduled them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from conserve_bench.config import ServePolicy
from conserve_bench.sched.latency import Sample, StepShape, shape_spread
from conserve_bench.sched.policy import step_kind
from conserve_bench.sched.sizes import size_class

PERCENTILES = (50, 90, 99)
# Where the plan's latency model is wrong (`prediction_by_class`): decode-only steps by their
# batch (a CPU's matrix kernels are not linear in it: on 2 cores a batch of 2 ran 1.09-1.27x
# its prediction at the median, batches of 3-4 0.88-0.99x), the others by their prefill tokens.
MIN_CLASS_STEPS = 8  # a class with fewer steps tells no bias
# `pool_rounds`' A/A row: online-only's later rounds against its first
AA_ENTRY = "online-only A/A (later rounds vs the first)"
GOAL_ATTAINMENT_RATIO = 0.95
GOAL = ("conserve's goal: SLO attainment within 5% of online-only's (ratio >= 0.95) while "
        "harvesting as much offline work as the slack allows (offline-only tok/s x "
        "online-only's idle share)")
# NOTE: `.value`: a report's policies are keyed by their labels, plain strings
ONLINE_ONLY = ServePolicy.ONLINE_ONLY.value
RATIO_BASES = (ONLINE_ONLY, ServePolicy.PRIORITY.value)
RATIO_METRICS = ("ttft_ms.p50", "ttft_ms.p90", "ttft_ms.p99", "tbt_ms.p50", "tbt_ms.p90",
                 "tbt_ms.p99", "tpot_ms.p99", "slo_attainment", "online_rps", "offline_tokens_per_s",
                 "offline_items_per_s")


@dataclass(frozen=True)
class OnlineRecord:
    """One online request as the client saw it; times in seconds since the phase's t=0."""

    index: int
    arrival_s: float  # when the workload says it arrives
    context_tokens: int
    generated_tokens: int  # requested (`max_tokens`, EOS ignored)
    ttft_s: float | None = None
    tbt_s: tuple[float, ...] = ()  # one gap per token after the first
    finished_s: float | None = None
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tbt_s) + 1 if self.ttft_s is not None else 0

    @property
    def completed(self) -> bool:
        return self.error is None and self.num_tokens == self.generated_tokens

    def meets_slo(self, ttft_slo_s: float, tbt_slo_s: float) -> bool:
        return (self.completed and self.ttft_s <= ttft_slo_s
                and all(gap <= tbt_slo_s for gap in self.tbt_s))


@dataclass(frozen=True)
class CounterSample:
    """The server's offline counters at `t_s` (seconds since the phase's t=0)."""

    t_s: float
    tokens: float
    items: float


@dataclass(frozen=True)
class StepRecord:
    """One engine step from the server's step log; `end_s` in seconds since the phase's t=0."""

    end_s: float
    step_s: float
    num_tokens: int
    num_offline_tokens: int
    predicted_s: float | None = None  # the ConServe plan's prediction (conserve only)
    profile_predicted_s: float | None = None  # the profile's model on the same step
    refit_predicted_s: float | None = None  # the latest live refit's (once there is one)
    aborted: bool = False  # abandoned at a layer safepoint: its tokens were discarded
    abort_layer: int | None = None  # attention layers it had completed
    arrival_to_abort_ms: float | None = None  # from the online arrival to the abort
    arrival_ns: int | None = None  # which arrival cut it (the server's monotonic clock)
    layer_group_ms: float | None = None  # the layer group that ended at the safepoint
    run_out_layer: int | None = None  # an arrival came at this layer's safepoint; it ran out
    arrival_to_end_ms: float | None = None  # from that arrival to the step's end
    online_queue_ms: tuple[float, ...] = ()  # per online request it scheduled first
    # per preempted request it resumed: (tokens computed before, loaded from its KV
    # checkpoint, found in the prefix cache, computed again)
    kv_resumes: tuple[tuple[int, int, int, int], ...] = ()
    shape: StepShape | None = None  # its batch, for the spread of steps of the same shape

    @classmethod
    def from_log(cls, sample, notes: dict[str, Any], started_at: float) -> StepRecord:
        """A step of the server's step log (`steplog.read_step_log_with_notes`), timed from
        `started_at` (Unix time)."""
        return cls(notes["end_at"] - started_at, sample.step_s, sample.shape.num_tokens,
                   notes.get("offline_tokens", 0), notes.get("predicted_s"),
                   profile_predicted_s=notes.get("profile_predicted_s"),
                   refit_predicted_s=notes.get("refit_predicted_s"), aborted=bool(notes.get("aborted")), abort_layer=notes.get("abort_layer"),
                   arrival_to_abort_ms=notes.get("arrival_to_abort_ms"),
                   arrival_ns=notes.get("arrival_ns"), layer_group_ms=notes.get("layer_group_ms"),
                   run_out_layer=notes.get("run_out_layer"), arrival_to_end_ms=notes.get("arrival_to_end_ms"),
                   online_queue_ms=tuple(notes.get("online_queue_ms", ())),
                   kv_resumes=tuple(tuple(r) for r in notes.get("kv_resumes", ())), shape=sample.shape)

    @property
    def kind(self) -> str:
        return step_kind(self.num_tokens, self.num_offline_tokens)

    def overlap_s(self, window_s: float) -> float:
        """How much of this step ran inside [0, window_s]."""
        return max(0.0, min(self.end_s, window_s) - max(self.end_s - self.step_s, 0.0))


@dataclass(frozen=True)
class PhaseResult:
    policy: str  # the phase's label (`setting.PolicyRun.label`)
    window_s: float  # the offline throughput window: [0, window_s]
    records: tuple[OnlineRecord, ...] = ()
    samples: tuple[CounterSample, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    steps: tuple[StepRecord, ...] = ()
    started_at: float | None = None  # t=0 as Unix time, to place the server's steps
    entry: str | None = None  # its `--policies` entry, one per round (None: the label)


def percentiles(values, pcts=PERCENTILES) -> dict[str, float | None]:
    """Linear-interpolated percentiles (numpy's default), `None` for no values."""
    ordered = sorted(values)
    return {f"p{p}": _percentile(ordered, p) for p in pcts}


def _percentile(ordered: list[float], pct: float) -> float | None:
    if not ordered:
        return None
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def counter_at(samples: tuple[CounterSample, ...], t_s: float) -> tuple[float, float]:
    """(tokens, items) at `t_s`, linear between the samples around it, clamped at the ends."""
    if not samples:
        return 0.0, 0.0
    before = [s for s in samples if s.t_s <= t_s] or [samples[0]]
    after = [s for s in samples if s.t_s >= t_s] or [samples[-1]]
    a, b = before[-1], after[0]
    w = (t_s - a.t_s) / (b.t_s - a.t_s) if b.t_s > a.t_s else 0.0
    return a.tokens + w * (b.tokens - a.tokens), a.items + w * (b.items - a.items)


def offline_totals(phase: PhaseResult) -> tuple[float, float]:
    """Offline (tokens, items) done inside the window."""
    start, end = counter_at(phase.samples, 0.0), counter_at(phase.samples, phase.window_s)
    return end[0] - start[0], end[1] - start[1]


def summarize_online(records, ttft_slo_s: float, tbt_slo_s: float) -> dict[str, Any]:
    done = [r for r in records if r.completed]
    num_met = sum(r.meets_slo(ttft_slo_s, tbt_slo_s) for r in records)
    first = min((r.arrival_s for r in records), default=0.0)
    last = max((r.finished_s for r in done), default=first)
    return {
        "ttft_ms": _ms(percentiles([r.ttft_s for r in done])),
        "tbt_ms": _ms(percentiles([gap for r in done for gap in r.tbt_s])),
        "tpot_ms": _ms(percentiles([_tpot(r) for r in done if r.tbt_s])),
        "slo_attainment": num_met / len(records) if records else None,
        "online_rps": len(done) / (last - first) if last > first else 0.0,
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "num_slo_met": num_met,
        "num_tbt_samples": sum(len(r.tbt_s) for r in done),
        "online_tokens": sum(r.num_tokens for r in done),
        "online_span_s": last - first,
    }


def _tpot(record: OnlineRecord) -> float:
    """Time per output token after the first (vLLM's TPOT): the mean gap."""
    return sum(record.tbt_s) / len(record.tbt_s)


# The tail ratios `bench` gives with a bootstrap interval: a 1.05x target told from noise.
TAIL_RATIOS = ("ttft_ms.p99", "tbt_ms.p99", "tpot_ms.p99")
BOOTSTRAP_RESAMPLES = 1000


def tail_intervals(records, base_records, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Each TAIL_RATIOS ratio of `records` over `base_records` (one run each), with a 95%
    bootstrap interval: both sides' completed requests resampled with replacement (a request's
    gaps stay together), the ratio recomputed `resamples` times."""
    import random

    ours = [r for r in records if r.completed]
    base = [r for r in base_records if r.completed]
    if not ours or not base:
        return {name: {"ratio": None, "low": None, "high": None} for name in TAIL_RATIOS}
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {name: [] for name in TAIL_RATIOS}
    for _ in range(resamples):
        a = summarize_tails([rng.choice(ours) for _ in ours])
        b = summarize_tails([rng.choice(base) for _ in base])
        for name in TAIL_RATIOS:
            if a[name] is not None and b[name]:
                draws[name].append(a[name] / b[name])
    point_a, point_b = summarize_tails(ours), summarize_tails(base)
    intervals = {}
    for name in TAIL_RATIOS:
        ordered = sorted(draws[name])
        ratio = _ratio(point_a[name], point_b[name])
        intervals[name] = {"ratio": ratio, "low": _percentile(ordered, 2.5),
                           "high": _percentile(ordered, 97.5)}
    return intervals


def summarize_tails(done) -> dict[str, float | None]:
    """P99 TTFT, TBT and TPOT (ms) of completed requests."""
    p = percentiles
    return {"ttft_ms.p99": _ms(p([r.ttft_s for r in done], (99,)))["p99"],
            "tbt_ms.p99": _ms(p([g for r in done for g in r.tbt_s], (99,)))["p99"],
            "tpot_ms.p99": _ms(p([_tpot(r) for r in done if r.tbt_s], (99,)))["p99"]}


def _ms(values: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else v * 1e3 for k, v in values.items()}


def summarize_steps(steps: tuple[StepRecord, ...], window_s: float) -> dict[str, Any] | None:
    """How the engine spent the window, from its step log (None without one).

    Each step counts by the share of it that ran inside the window, so a long step that
    straddles an edge counts in part: `offline_computed_tokens_per_s` is the offline tokens
    the engine computed in steps that ran to the end, a finer measure than the completions
    behind `offline_tokens_per_s` (it also counts work that a preemption later threw away).
    """
    inside = _inside(steps, window_s)
    if not inside:
        return None
    def busy_pct(pairs) -> float:
        return 100 * sum(s.step_s * share for s, share in pairs) / window_s

    by_kind = {}
    for kind in ("online", "mixed", "offline"):
        of_kind = [(s, share) for s, share in inside if s.kind == kind]
        by_kind[kind] = {"num_steps": len(of_kind), "busy_pct": busy_pct(of_kind),
                         "step_ms": _ms(percentiles([s.step_s for s, _ in of_kind]))}
    return {
        "num_steps": len(inside),
        "busy_pct": busy_pct(inside),
        "offline_computed_tokens_per_s":
            sum(s.num_offline_tokens * share for s, share in inside if not s.aborted) / window_s,
        "by_kind": by_kind,
        **prediction_errors([s for s, _ in inside]),
        "model_rel_error": _model_errors([s for s, _ in inside]),
        "prediction_by_class": prediction_by_class([s for s, _ in inside]),
    }


def step_class(step: StepRecord) -> str | None:
    """"<kind> <size class>" (`sizes.size_class`: "online decodes 2", "mixed prefill 1-63 +
    decodes"); None without a shape."""
    name = size_class(step.shape) if step.shape is not None else None
    return f"{step.kind} {name}" if name is not None else None


def prediction_by_class(steps: Sequence[StepRecord]) -> dict[str, dict[str, Any]] | None:
    """Measured over predicted time (the plan's prediction) by `step_class`, for the classes of
    at least MIN_CLASS_STEPS steps that ran to the end: where the latency model is wrong
    beyond the same-shape spread, and which way (None without predictions)."""
    by_class: dict[str, list[float]] = {}
    for step in steps:
        if not step.aborted and step.predicted_s and (name := step_class(step)) is not None:
            by_class.setdefault(name, []).append(step.step_s / step.predicted_s)
    found = {name: {"num_steps": len(ratios), **percentiles(ratios, (10, 50, 90))}
             for name, ratios in sorted(by_class.items()) if len(ratios) >= MIN_CLASS_STEPS}
    return found or None


def prediction_errors(steps: Sequence[StepRecord], pcts=PERCENTILES) -> dict[str, Any]:
    """The plan's relative prediction error (conserve's steps: none for the other policies)
    beside the floor under it, the same-shape spread (`latency.shape_spread`: each step
    against its own shape's median), over the steps that ran to the end: an abandoned step
    ran part of its plan. None for either without steps to measure it on."""
    ran = [s for s in steps if not s.aborted]
    errors = [abs(s.predicted_s - s.step_s) / s.step_s for s in ran if s.predicted_s is not None]
    spread = shape_spread([Sample(s.shape, s.step_s) for s in ran if s.shape is not None])
    return {"prediction_rel_error": percentiles(errors, pcts) if errors else None,
            "shape_spread_rel": percentiles(spread, pcts) if spread else None}


def _model_errors(steps: list[StepRecord]) -> dict[str, Any] | None:
    """The profile's and the live refit's prediction errors, side by side on the same steps:
    those that had a refit to predict them (None before the first refit)."""
    both = [s for s in steps if s.refit_predicted_s is not None and s.profile_predicted_s is not None]
    if not both:
        return None
    def rel(predicted: str) -> dict[str, float | None]:
        return percentiles([abs(getattr(s, predicted) - s.step_s) / s.step_s for s in both])

    return {"num_steps": len(both), "profile": rel("profile_predicted_s"),
            "refit": rel("refit_predicted_s")}


def _inside(steps: tuple[StepRecord, ...], window_s: float) -> list[tuple[StepRecord, float]]:
    """(step, share of it inside [0, window_s]) for the steps that ran in the window."""
    if window_s <= 0:
        return []
    shares = [(s, s.overlap_s(window_s) / s.step_s) for s in steps if s.step_s > 0]
    return [(s, share) for s, share in shares if share > 0]


def summarize_preemptions(steps: tuple[StepRecord, ...], window_s: float) -> dict[str, Any] | None:
    """The steps abandoned at a layer safepoint in the window, and those an arrival let run
    out (little of them was left), with how long it waited for their end (None without a step
    log).

    `arrival_to_abort_ms` counts the first step each arrival cut: a step planned before its
    request reached the scheduler is cut again at its first safepoint, and that wait is the
    front end's hand-off, not the safepoint's.
    """
    inside = _inside(steps, window_s)
    if not inside:
        return None
    aborted = [s for s, _ in inside if s.aborted]
    layers = [s.abort_layer for s in aborted if s.abort_layer is not None]
    run_out = [s for s, _ in inside if s.run_out_layer is not None and s.arrival_to_end_ms is not None]
    first_cuts = {}
    for step in sorted(aborted, key=lambda s: s.end_s):
        if step.arrival_to_abort_ms is not None:
            first_cuts.setdefault(step.arrival_ns, step.arrival_to_abort_ms)
    return {
        "num_preemptions": len(aborted),
        "num_arrivals": len(first_cuts),
        "arrival_to_abort_ms": percentiles(first_cuts.values(), (50, 99)),
        "layer_group_ms": percentiles([s.layer_group_ms for s in aborted
                                       if s.layer_group_ms is not None], (50, 99)),
        "abort_layer": {**percentiles(layers, (50,)), "min": min(layers, default=None),
                        "max": max(layers, default=None)},
        "offline_tokens_discarded": sum(s.num_offline_tokens for s in aborted),
        "num_run_out": len(run_out),
        "arrival_to_end_ms": percentiles([s.arrival_to_end_ms for s in run_out], (50, 99)),
    }


def summarize_kv_resumes(steps: tuple[StepRecord, ...], window_s: float) -> dict[str, Any] | None:
    """Offline requests preempted for KV blocks and resumed in the window (steps that ran to
    the end): what they had computed, and how much of it was loaded from KV checkpoints,
    found in vLLM's prefix cache, or computed again (None without a step log)."""
    inside = _inside(steps, window_s)
    if not inside:
        return None
    resumes = [r for s, _ in inside if not s.aborted for r in s.kv_resumes]
    totals = [sum(r[i] for r in resumes) for i in range(4)]
    return {"num_resumes": len(resumes), "progress_tokens": totals[0], "loaded_tokens": totals[1],
            "prefix_cached_tokens": totals[2], "recomputed_tokens": totals[3],
            "recomputed_tokens_per_resume": percentiles([r[3] for r in resumes], (50, 99))}


def summarize_online_queue(steps: tuple[StepRecord, ...], window_s: float) -> dict[str, Any] | None:
    """Server side, per online request first scheduled in the window: from its arrival at the
    server to the first step that scheduled it (None without a step log)."""
    inside = _inside(steps, window_s)
    if not inside:
        return None
    return percentiles([wait for s, _ in inside for wait in s.online_queue_ms], (50, 99))


def summarize_phase(phase: PhaseResult, ttft_slo_s: float, tbt_slo_s: float,
                    offline_only_tokens_per_s: float | None) -> dict[str, Any]:
    tokens, items = offline_totals(phase)
    tokens_per_s = tokens / phase.window_s if phase.window_s > 0 else 0.0
    return {
        **summarize_online(phase.records, ttft_slo_s, tbt_slo_s),
        "steps": summarize_steps(phase.steps, phase.window_s),
        "preemptions": summarize_preemptions(phase.steps, phase.window_s),
        "kv_resumes": summarize_kv_resumes(phase.steps, phase.window_s),
        "online_queue_ms": summarize_online_queue(phase.steps, phase.window_s),
        "offline_tokens_per_s": tokens_per_s,
        "offline_items_per_s": items / phase.window_s if phase.window_s > 0 else 0.0,
        "offline_pct_of_offline_only": _ratio(tokens_per_s, offline_only_tokens_per_s, 100.0),
        "offline_tokens": tokens,
        "offline_items": items,
        "window_s": phase.window_s,
        **phase.extra,
    }


def _ratio(part, whole, scale: float = 1.0) -> float | None:
    return None if part is None or not whole else scale * part / whole


def metric(summary: dict[str, Any], name: str):
    """A metric by dotted name: 'ttft_ms.p99' -> summary['ttft_ms']['p99']."""
    for key in name.split("."):
        summary = summary.get(key) if isinstance(summary, dict) else None
    return summary


def ratios(summary: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """Each RATIO_METRIC of `summary` divided by the same of `base` (None where undefined)."""
    return {name: _ratio(metric(summary, name), metric(base, name)) for name in RATIO_METRICS}


def ratio_bases(label: str, labels) -> list[str]:
    """What a `--policies` entry is compared with: RATIO_BASES, and the other entries of the
    same policy (`conserve` and `conserve:--kv-checkpoint-gib=0` with each other)."""
    same_policy = [b for b in labels if b != label and b.partition(":")[0] == label.partition(":")[0]]
    return [b for b in RATIO_BASES if b in labels] + [b for b in same_policy if b not in RATIO_BASES]


def build_report(config: dict[str, Any], offline_only: PhaseResult,
                 phases: list[PhaseResult]) -> dict[str, Any]:
    """The whole report: config, offline-only baseline, slack, one entry per policy, ratios."""
    ttft_slo_s, tbt_slo_s = config["ttft_slo_ms"] / 1e3, config["tbt_slo_ms"] / 1e3
    baseline = summarize_phase(offline_only, ttft_slo_s, tbt_slo_s, None)
    policies = {p.policy: summarize_phase(p, ttft_slo_s, tbt_slo_s, baseline["offline_tokens_per_s"])
                for p in phases}
    records = {p.policy: p.records for p in phases}
    for label, summary in policies.items():
        summary["ratios"] = {f"vs_{b}": ratios(summary, policies[b]) for b in ratio_bases(label, policies)}
        if label != ONLINE_ONLY and ONLINE_ONLY in records:
            summary["tail_intervals"] = {f"vs_{ONLINE_ONLY}": tail_intervals(records[label],
                                                                             records[ONLINE_ONLY])}
    offline = {k: baseline[k] for k in ("offline_tokens_per_s", "offline_items_per_s",
                                        "offline_tokens", "offline_items", "window_s")}
    offline["measured"] = bool(offline_only.samples)
    offline["timings"] = offline_only.extra.get("timings", {})
    slack = slack_of(offline["offline_tokens_per_s"] if offline["measured"] else None,
                     policies.get(ONLINE_ONLY))
    for summary in policies.values():
        summary["goal"] = goal_of(summary, policies.get(ONLINE_ONLY), slack)
    report = {"config": config, "offline_only": offline, "slack": slack, "policies": policies, "goal": GOAL}
    if pooled := pool_rounds(phases, policies, offline["offline_tokens_per_s"] if offline["measured"] else None):
        report["pooled"] = pooled
    return report


def pool_rounds(phases: list[PhaseResult], policies: dict[str, dict[str, Any]],
                offline_only_tokens_per_s: float | None) -> dict[str, dict[str, Any]]:
    """Per `--policies` entry, its rounds (`--rounds`) against online-only's rounds: the online
    requests of every round pooled (P99 ratios with a bootstrap interval), SLO attainment and
    offline tokens/s averaged over rounds (each round replays the same requests), the slack
    averaged over online-only's rounds. Then AA_ENTRY: online-only's later rounds against its
    first, the same way, how far apart one policy's runs land on this host (a target tighter
    than that cannot be told from the host). Empty with one round.

    NOTE: the rounds alternate, so the host's drift between phases minutes apart (on 2-core
    hosts here as large as the effects measured) falls on every policy alike. A bootstrap
    interval resamples requests, not phases: it does not hold that drift; the A/A row shows it."""
    rounds: dict[str, list[str]] = {}
    for phase in phases:
        rounds.setdefault(phase.entry or phase.policy, []).append(phase.policy)
    base = rounds.get(ONLINE_ONLY)
    if base is None or len(base) < 2:
        return {}
    records = {p.policy: p.records for p in phases}

    def against(labels: list[str], base_labels: list[str]) -> dict[str, Any]:
        """`labels`' rounds pooled against `base_labels`' (requests, P99 ratios, attainment)."""
        attainment = _mean(policies[label]["slo_attainment"] for label in labels)
        base_attainment = _mean(policies[label]["slo_attainment"] for label in base_labels)
        pooled_records = [r for label in labels for r in records[label]]
        return {"rounds": len(labels), "requests": len(pooled_records),
                "tail_intervals": (None if labels == base_labels else tail_intervals(
                    pooled_records, [r for label in base_labels for r in records[label]])),
                "slo_attainment": attainment, "online_only_slo_attainment": base_attainment,
                "slo_attainment_difference": (None if attainment is None or base_attainment is None
                                              else attainment - base_attainment)}

    slacks = [slack_of(offline_only_tokens_per_s, policies[label]) for label in base]
    slack = _mean(s and s["tokens_per_s"] for s in slacks)
    pooled = {}
    for entry, labels in rounds.items():
        offline = _mean(policies[label]["offline_tokens_per_s"] for label in labels)
        pooled[entry] = {**against(labels, base), "offline_tokens_per_s": offline,
                         "slack_tokens_per_s": slack, "harvest_pct_of_slack": _ratio(offline, slack, 100.0)}
    pooled[AA_ENTRY] = {**against(base[1:], base[:1]), "offline_tokens_per_s": None,
                        "slack_tokens_per_s": None, "harvest_pct_of_slack": None}
    return pooled


def _mean(values) -> float | None:
    """The mean of `values`, or None if any is None (or there are none)."""
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def slack_of(offline_only_tokens_per_s: float | None,
             online_only: dict[str, Any] | None) -> dict[str, Any] | None:
    """Offline-only tokens/s x the share of the window online-only's engine was idle (None
    without both: no offline-only phase, or no online-only phase with a step log)."""
    steps = (online_only or {}).get("steps")
    if offline_only_tokens_per_s is None or not steps:
        return None
    idle_share = max(0.0, 1 - steps["busy_pct"] / 100)
    return {"offline_only_tokens_per_s": offline_only_tokens_per_s,
            "online_only_idle_share": idle_share,
            "tokens_per_s": offline_only_tokens_per_s * idle_share}


def goal_of(summary: dict[str, Any], online_only: dict[str, Any] | None,
            slack: dict[str, Any] | None) -> dict[str, Any]:
    """A policy against the goal: its attainment next to online-only's (ratio, difference)
    and its harvest next to the slack."""
    base = None if online_only is None else online_only["slo_attainment"]
    own = summary["slo_attainment"]
    ratio = _ratio(own, base)
    return {
        "slo_attainment": own, "online_only_slo_attainment": base,
        "slo_attainment_ratio": ratio,
        "slo_attainment_difference": None if own is None or base is None else own - base,
        "attainment_met": None if ratio is None else ratio >= GOAL_ATTAINMENT_RATIO,
        "slack_tokens_per_s": None if slack is None else slack["tokens_per_s"],
        "harvest_pct_of_slack": _ratio(summary["offline_tokens_per_s"],
                                       None if slack is None else slack["tokens_per_s"], 100.0),
    }


def report_dict(config) -> dict[str, Any]:
    """A frozen dataclass config as JSON-ready data."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
