"""ConServe's scheduling policy: which requests run in the next engine step, with how many tokens.

`plan_step(online, offline, model, targets, max_num_tokens)` plans one step over plain data.
Online work is planned first; offline work then takes only what the latency model says fits.
Two modes (`Targets.max_slowdown`): *bounded* (the default) plans online work exactly as vLLM
alone would and lets offline work add at most a share to it; *SLO* spends explicit TTFT/TBT
targets (steps filled up to the TBT target, long online prompts chunked). An offline-only step
is capped by how long an online arrival may wait behind it (a quantum) or, with layer-wise
preemption, sized for throughput. Pure functions: this module must never import vLLM or
torch, or read a clock. `scheduler.ConserveScheduler` builds the inputs and applies the plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from conserve_bench.errors import ConserveError
from conserve_bench.sched.latency import ChunkShape, LatencyModel, StepShape

DEFAULT_MARGIN = 0.1  # offline work may use (1 - margin) of the TBT target
QUANTUM_FRACTION = 0.25  # default quantum: a quarter of the TTFT target
# Defaults derived from a latency profile (`default_targets`): a decode-only step is the TBT
# floor; a prefill of a typical chat prompt is the TTFT floor.
TBT_DECODE_FACTOR = 5.0
TBT_DECODE_CONTEXT = 512
TTFT_PREFILL_FACTOR = 2.0
TTFT_PREFILL_TOKENS = 1024
SLO_RULE = (f"TTFT = {TTFT_PREFILL_FACTOR:g} x a {TTFT_PREFILL_TOKENS}-token prefill, "
            f"TBT = {TBT_DECODE_FACTOR:g} x a decode step at {TBT_DECODE_CONTEXT} tokens of context")
# The bounded mode's promise: online P99 TTFT and TBT within HARM_BOUND x what online work
# alone gets. Planned against the live tail (`TailFactors`, the default) the share offline work
# adds to a step is the bound's own: the model's error is measured per step kind and taken off
# there. Planned on the prediction, the profile's error comes off the share
# (`derived_max_slowdown`): a step predicted 5% longer may run 5% x (1 + error) longer.
HARM_BOUND = 1.05
DEFAULT_MODEL_ERROR = 0.05  # assumed when the profile carries no held-out error
MIN_SLOWDOWN = 0.01  # offline decodes join online ones only where they cost next to nothing
# An online arrival waits behind an offline-only step at most `max_slowdown` x the prefill of
# a reference prompt: the 90th percentile of recent online prompts (`ConserveScheduler`),
# this many tokens until the first arrives.
DEFAULT_REFERENCE_PROMPT_TOKENS = 256
# Layer-wise preemption: an offline-only step may be abandoned every this many decoder layers
# (the paper's k) where a safepoint waits for the device (CUDA); on the CPU a safepoint reads a
# clock and a shared counter, so every layer is one (`safepoint_every`).
SAFEPOINT_EVERY = 4
# Offline work is sized against this quantile of a step's live time, per step kind
# (`refit.TailMargin`): the promise is about online P99 TBT, which the slow steps set.
DEFAULT_TAIL_QUANTILE = 0.9
# With layer-wise preemption, an offline-only step is the smallest that reaches this share of
# the best offline tokens/s the latency model predicts for one step.
OFFLINE_STEP_THROUGHPUT_SHARE = 0.95


class PolicyError(ConserveError, ValueError):
    pass


@dataclass(frozen=True)
class TailFactors:
    """How much longer than the latency model predicts steps of each kind run at the planning
    quantile (`refit.TailMargin`, from live steps): offline work is sized so that the step's
    quantile, not its mean, stays within the budget. 1.0: plan on the mean."""

    online: float = 1.0
    mixed: float = 1.0
    offline: float = 1.0

    def budget(self, budget_s: float, kind: str, bounded: bool) -> float:
        """`budget_s` for a step of `kind` ("mixed", "offline") planned against the tail: in
        SLO mode the budget is absolute; bounded, it is relative to the online work's own
        time, whose tail online-only serving has too: only the excess of `kind`'s counts."""
        factor = getattr(self, kind) / (self.online if bounded else 1.0)
        return budget_s / max(1.0, factor)


@dataclass(frozen=True)
class Pending:
    """A request that could take part in the next step, as the policy sees it."""

    request_id: str
    num_new_tokens: int  # what it still needs: the rest of its prompt, or 1 for a decode
    num_context: int  # tokens already in its KV cache (computed, or hit in the prefix cache)
    decode: bool = False  # past its prompt: it adds one token per step
    prompt_logprobs: bool = False
    running: bool = True  # in vLLM's running list (holds KV blocks), not waiting

    def __post_init__(self) -> None:
        if self.num_new_tokens < 1 or self.num_context < 0:
            raise PolicyError(f"a pending request needs >= 1 new token and context >= 0: {self}")


@dataclass(frozen=True)
class Targets:
    """Online latency targets (seconds) and how offline work is sized against them.

    `max_slowdown` None: SLO mode, offline work fills a step with online work up to
    `mixed_budget_s` and an offline-only step up to `offline_budget_s` (the quantum). A share
    (bounded mode): offline work adds at most that share to a step's online decodes, nothing
    to a step that carries an online prompt, and an offline-only step is at most that share
    of the prefill of `reference_prompt_tokens` (or `quantum_s` when given); `ttft_s`/`tbt_s` then only
    count SLO attainment. In either mode, `offline_step_s` (layer-wise preemption) sizes
    offline-only steps for throughput instead: an arrival cuts them at the next safepoint.
    """

    ttft_s: float
    tbt_s: float
    margin: float = DEFAULT_MARGIN
    # how long an online arrival may wait behind offline-only work (`arrival_wait_s`): without
    # layer-wise preemption the longest offline-only step. None: derived from the targets
    quantum_s: float | None = None
    max_slowdown: float | None = None  # None: SLO mode
    reference_prompt_tokens: int = DEFAULT_REFERENCE_PROMPT_TOKENS
    # With layer-wise preemption: the offline-only step, sized for throughput (replaces the
    # quantum, since an arrival no longer waits for the step to end). None: no preemption.
    offline_step_s: float | None = None
    # Online arrivals per second of the engine's time without online work, recently
    # (`arrivals.ArrivalRate`): the rate offline-only steps are cut at; a cut step's work is
    # lost, so they shorten as arrivals come more often (`offline_step_for`).
    arrival_rate: float | None = None

    def __post_init__(self) -> None:
        check_targets(self.ttft_s, self.tbt_s, self.margin, self.quantum_s, self.preemptive)
        if self.max_slowdown is not None and not self.max_slowdown > 0:
            raise PolicyError(f"the slowdown share must be > 0, got {self.max_slowdown:g}")
        if self.reference_prompt_tokens < 1:
            raise PolicyError(f"the reference prompt needs >= 1 token, got {self.reference_prompt_tokens}")
        if self.offline_step_s is not None and not self.offline_step_s > 0:
            raise PolicyError(f"the offline step must be > 0, got {self.offline_step_s * 1e3:g} ms")

    @property
    def bounded(self) -> bool:
        return self.max_slowdown is not None

    @property
    def preemptive(self) -> bool:
        """Layer-wise preemption cuts offline-only steps: they are sized for throughput."""
        return self.offline_step_s is not None

    @property
    def mixed_budget_s(self) -> float:
        """SLO mode: the longest step offline work may stretch to while online work is present."""
        return self.tbt_s * (1 - self.margin)

    @property
    def offline_budget_s(self) -> float:
        """SLO mode without layer-wise preemption: the longest offline-only step, the quantum
        (how long an online arrival may wait behind it). `quantum_for` gives it in every mode."""
        return self.quantum_s if self.quantum_s is not None else self.ttft_s * QUANTUM_FRACTION

    def quantum_for(self, model: LatencyModel) -> float:
        """The longest offline-only step: sized for throughput under layer-wise preemption
        (an arrival waits one layer group, not the step) and for what arrivals cut off it
        (`offline_step_for`), else how long an arrival may wait."""
        if self.preemptive:
            return offline_step_for(self.offline_step_s, model.predict(StepShape()), self.arrival_rate,
                                    self.arrival_wait_s(model))
        if not self.bounded or self.quantum_s is not None:
            return self.offline_budget_s
        share, floor = self._bounded_quantum(model)
        return floor + share

    def arrival_wait_s(self, model: LatencyModel) -> float:
        """How long an online arrival may wait behind offline-only work: the quantum (SLO mode,
        or when given), else `max_slowdown` x the reference prompt's prefill. Without
        layer-wise preemption it bounds the offline-only step; with it, what is left of a
        step when an arrival comes (`run_out_share`)."""
        if not self.bounded or self.quantum_s is not None:
            return self.offline_budget_s
        return self._bounded_quantum(model)[0]

    def _bounded_quantum(self, model: LatencyModel) -> tuple[float, float]:
        """The bounded mode's quantum as (the share of the reference prefill, the cost it is
        added to). NOTE: every step pays the fixed cost of one token's step: a share below it
        cannot be honoured, and held to it an offline-only step would carry one token and pay
        that cost for it. Offline work then adds the share on top of the cost any step pays."""
        reference = StepShape(prefills=(ChunkShape(self.reference_prompt_tokens, 0),))
        share = self.max_slowdown * model.predict(reference)
        smallest = model.predict(StepShape(prefills=(ChunkShape(1, 0),)))
        return share, (smallest if share < smallest else 0.0)

    def budget_for(self, model: LatencyModel, online: StepShape) -> float:
        """The longest step offline work may make of a step whose online part is `online`."""
        if not self.bounded:
            return self.mixed_budget_s
        if online.prefills:  # NOTE: its TTFT has paid the wait behind an offline-only step
            return model.predict(online)
        return (1 + self.max_slowdown) * model.predict(online)

    def describe(self, model: LatencyModel) -> str:
        """One line: what bounds offline work (printed at start-up)."""
        slos = f"SLOs TTFT {self.ttft_s * 1e3:.0f} ms, TBT {self.tbt_s * 1e3:.0f} ms"
        quantum = self.quantum_for(model) * 1e3
        offline_only = (f"offline-only steps of {quantum:.0f} ms (shorter as online requests "
                        "arrive more often), cut at a layer safepoint when online work arrives"
                        if self.preemptive else
                        f"offline-only steps <= {quantum:.0f} ms")
        if self.preemptive and (wait := self.arrival_wait_s(model)):
            offline_only += f" unless what is left of them takes <= {wait * 1e3:.0f} ms"
        if not self.bounded:
            return (f"{slos} (spent: steps with online work up to {self.mixed_budget_s * 1e3:.0f} "
                    f"ms, {offline_only})")
        if not self.preemptive and self.quantum_s is None:
            offline_only += (f" ({self.max_slowdown:.0%} of a {self.reference_prompt_tokens}-token "
                             "prefill, then of the 90th-percentile online prompt")
            if self._bounded_quantum(model)[1]:
                offline_only += ", on top of a step's fixed cost, which is more"
            offline_only += ")"
        return (f"bounded: offline work adds <= {self.max_slowdown:.0%} to a step's online "
                f"decodes, nothing to online prefills; {offline_only}; {slos} (counted only)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Targets:
        return cls(**data)


def check_tail_quantile(quantile: float | None) -> None:
    """The planning quantile of step time (`PolicyConfig.tail_quantile`): None (or 0, as
    `serve --tail-quantile 0` gives it) plans on the prediction."""
    if quantile and not 0.5 <= quantile < 1:
        raise PolicyError(f"--tail-quantile must be in [0.5, 1) (0: plan on the prediction), "
                          f"got {quantile:g}")


def check_targets(ttft_s: float | None, tbt_s: float | None, margin: float,
                  quantum_s: float | None, preemptive: bool = False) -> None:
    """What every set of targets obeys (None: not given, derived later); PolicyError if not.
    With layer-wise preemption the quantum may be 0: an arrival waits for no offline work
    (every armed step is cut at its next safepoint, however little of it is left)."""
    for name, value in (("TTFT target", ttft_s), ("TBT target", tbt_s)):
        if value is not None and not value > 0:
            raise PolicyError(f"the {name} must be > 0, got {value * 1e3:g} ms")
    if quantum_s is not None and not (quantum_s >= 0 if preemptive else quantum_s > 0):
        raise PolicyError(f"the preemption quantum must be {'>= 0' if preemptive else '> 0'}, "
                          f"got {quantum_s * 1e3:g} ms")
    if not 0 <= margin < 1:
        raise PolicyError(f"the SLO margin must be in [0, 1), got {margin:g}")


def default_targets(model: LatencyModel, margin: float = DEFAULT_MARGIN,
                    quantum_s: float | None = None, max_slowdown: float | None = None) -> Targets:
    """Targets from a latency profile, for when the user sets none (`SLO_RULE`).

    TBT: TBT_DECODE_FACTOR x one decode at TBT_DECODE_CONTEXT tokens of context (the floor of
    any step); TTFT: TTFT_PREFILL_FACTOR x a TTFT_PREFILL_TOKENS-token prefill.
    """
    decode = model.predict(StepShape(decode_context_lens=(TBT_DECODE_CONTEXT,)))
    prefill = model.predict(StepShape(prefills=(ChunkShape(TTFT_PREFILL_TOKENS, 0),)))
    return Targets(ttft_s=TTFT_PREFILL_FACTOR * prefill, tbt_s=TBT_DECODE_FACTOR * decode,
                   margin=margin, quantum_s=quantum_s, max_slowdown=max_slowdown)


def derived_max_slowdown(model_error: float | None, against_tail: bool = True) -> float:
    """The share offline work may add to a step with online decodes. `against_tail` (a
    planning quantile is set): HARM_BOUND's, as the live tail factors size each step kind's
    offline work for its measured error. Else a step's time is known to within `model_error`
    (relative, e.g. the profile's held-out P90): (1 + share) x (1 + error) = HARM_BOUND."""
    if against_tail:
        return HARM_BOUND - 1
    error = DEFAULT_MODEL_ERROR if model_error is None else model_error
    return max(MIN_SLOWDOWN, HARM_BOUND / (1 + error) - 1)


def offline_step_for(step_s: float, fixed_s: float, arrival_rate: float | None,
                     wait_s: float = 0.0) -> float:
    """The offline-only step under layer-wise preemption: `step_s` (sized for throughput)
    while online requests seldom arrive, shorter as they come more often.

    NOTE: an arrival cuts the step and its work so far is lost, unless what is left of the
    step fits in the wait an arrival may have behind offline work (`wait_s`): then it runs
    out (`run_out_share`). Arrivals at rate r (per second of offline-only steps: those that
    come while online work runs cut none) lose about r x (T - w)^2 / 2 of every step of T,
    and each step pays its fixed cost f: the share of engine time lost,
    f / T + r x (T - w)^2 / 2T, is least at T = sqrt(2 f / r + w^2) (with w = 0 about 0.26 s
    at one arrival a second on 2 CPU cores, 0.53 s at one every 4 s). Never below the fixed
    cost."""
    if not arrival_rate:
        return step_s
    return min(step_s, max(fixed_s, math.sqrt(2 * fixed_s / arrival_rate + wait_s ** 2)))


def run_out_share(predicted_s: float, wait_s: float) -> float:
    """The share of an armed offline-only step's layers from which an arrival no longer cuts
    it: what is left then, of a step predicted to take `predicted_s`, fits in `wait_s`, the
    wait an arrival may have behind offline work (`Targets.arrival_wait_s`). The step's work
    so far is kept, and the arrival waits no longer than it would behind an offline-only step
    without layer-wise preemption. 0.0: never cut; 1.0: cut at any safepoint."""
    if predicted_s <= wait_s:
        return 0.0
    return 1.0 - wait_s / predicted_s


def safepoint_every(waits_for_device: bool) -> int:
    """Decoder layers between two safepoints: SAFEPOINT_EVERY where a safepoint waits for the
    device (CUDA's run-ahead bound), else 1: an arrival waits one layer, not four."""
    return SAFEPOINT_EVERY if waits_for_device else 1


def default_offline_step_s(model: LatencyModel, max_num_tokens: int,
                           share: float = OFFLINE_STEP_THROUGHPUT_SHARE) -> float:
    """The predicted time of the smallest offline-only prefill chunk whose tokens/s is within
    `share` of the best any chunk of up to `max_num_tokens` reaches (layer-wise preemption).

    NOTE: the tokens/s compared leave out the chunk's attention: a prompt attends to itself
    the same however it is chunked (chunks of n after c cached tokens sum n(2c + n)/2 to the
    prompt's length squared over 2), so only what every step pays whatever it carries (the
    fixed cost) amortizes over a longer chunk. Counted as a cost of the chunk's size, it made
    steps a third as long and 15% of an offline-only engine's time fixed costs."""
    def amortized_s(n: int) -> float:
        chunk = StepShape(prefills=(ChunkShape(n, 0),))
        return max(model.predict(chunk) - model.prefill_attention_s(chunk), 1e-9)

    best = max_num_tokens / amortized_s(max_num_tokens)  # NOTE: tokens/s grows with n
    num = next(n for n in range(1, max_num_tokens + 1) if n / amortized_s(n) >= share * best)
    return model.predict(StepShape(prefills=(ChunkShape(num, 0),)))


@dataclass(frozen=True)
class StepPlan:
    """One step: tokens per request, in the order vLLM takes them, and what sized it."""

    num_tokens: tuple[tuple[str, int], ...] = ()  # (request id, tokens), vLLM's order
    deferred_ids: frozenset[str] = frozenset()  # running offline requests held back this step
    num_online_tokens: int = 0
    budget_s: float = 0.0  # what offline work was sized against
    predicted_s: float = 0.0  # the latency model's prediction for the whole step
    shape: StepShape = field(default_factory=StepShape)

    @property
    def token_budget(self) -> int:
        return sum(n for _, n in self.num_tokens)

    @property
    def num_offline_tokens(self) -> int:
        return self.token_budget - self.num_online_tokens

    @property
    def kind(self) -> str:
        return step_kind(self.token_budget, self.num_offline_tokens)


def step_kind(num_tokens: int, num_offline_tokens: int) -> str:
    """"idle", "online", "mixed" or "offline", by whose tokens a step runs (only offline-only
    steps may be cut short at a layer safepoint: layer-wise preemption)."""
    if not num_tokens:
        return "idle"
    if num_offline_tokens == num_tokens:
        return "offline"
    return "mixed" if num_offline_tokens else "online"


def plan_step(online: Sequence[Pending], offline: Sequence[Pending], model: LatencyModel,
              targets: Targets, max_num_tokens: int, batch_apart: bool = False,
              tail: TailFactors = TailFactors(), offline_held: bool = False) -> StepPlan:
    """Plan one engine step.

    `online` and `offline` come in vLLM's order: running requests (in running-list order), then
    waiting ones (in queue order). `max_num_tokens` is vLLM's per-step token budget.

    Online first: running decodes, then prefills (running, then waiting), each
    `min(need, tokens left)`. In SLO mode, while online decodes are running, an online prefill
    chunk is held to what fits in `targets.mixed_budget_s`, but never below its TTFT share
    (`_ttft_chunk`), so that no decode stalls behind a whole long prompt. Offline requests
    follow, offline decodes first (each holds KV blocks and frees them soonest), while the
    predicted step time stays within `targets.budget_for` the online part (online work
    present) or `targets.quantum_for` (none). With no online work, the first offline request
    always gets at least one token. `batch_apart`: offline requests never share a step with
    online ones (deterministic scoring where vLLM has no batch-invariant kernels): while any
    online work is pending, every offline request waits. `tail`: the budgets are for the
    planning quantile of a step's time, not its prediction (`TailFactors.budget`); offline-only
    steps sized for throughput (layer-wise preemption: an arrival cuts them) are not shrunk,
    and carry the running offline decodes on top of their budget (`_decodes_cost`).
    `offline_held`: an online request that cut a step is still on its way to the scheduler
    (`arrivals.ArrivalBook.in_hand_off`): offline work waits, even with no online work.
    """
    step = _Step(model, max_num_tokens)
    chunk_online = not targets.bounded and any(r.decode for r in online)
    online_waiting_planned = stopped = False
    for request in _decodes_first(online):
        num = min(request.num_new_tokens, step.num_tokens_left)
        if chunk_online and not request.decode:
            num = min(num, max(step.fit(request, targets.mixed_budget_s),
                               _ttft_chunk(request, targets)))
        step.add(request, num)
        online_waiting_planned |= num > 0 and not request.running
        # NOTE: vLLM gives a request min(need, budget left): after a partial chunk, anything
        # planned later in vLLM's order would hand that chunk its tokens.
        if num < request.num_new_tokens:
            stopped = True
            break
    num_online_tokens = max_num_tokens - step.num_tokens_left
    has_online = bool(online)
    if has_online:
        budget_s = tail.budget(targets.budget_for(model, step.shape), "mixed", targets.bounded)
    else:
        budget_s = targets.quantum_for(model)
        if targets.preemptive:
            budget_s += _decodes_cost(offline, model)
        else:
            budget_s = tail.budget(budget_s, "offline", targets.bounded)
    deferred = set()
    least = _least_contexts(offline)
    for request in _decodes_first(offline):
        num = (0 if stopped or offline_held or (batch_apart and has_online)
               else step.fit(request, budget_s, least[request.decode, request.prompt_logprobs]))
        # NOTE: vLLM takes every running request before any waiting one: a running offline
        # request given a partial chunk would take the tokens planned for waiting online work.
        partial = num < request.num_new_tokens
        if request.running and (num == 0 or (partial and online_waiting_planned)):
            deferred.add(request.request_id)  # vLLM skips it this step (it keeps its blocks)
            continue
        if num == 0:
            break  # waiting requests are admitted in queue order: nothing after it fits either
        step.add(request, num)
        stopped = partial
    if not has_online and not step.entries and offline and not offline_held:
        first = _decodes_first(offline)[0]
        step.add(first, 1)  # NOTE: offline always progresses while online is idle
        deferred.discard(first.request_id)
    return StepPlan(tuple(step.entries), frozenset(deferred), num_online_tokens, budget_s,
                    model.predict(step.shape), step.shape)


def within_reach(waiting: Iterable[Pending], max_num_tokens: int) -> list[Pending]:
    """The waiting requests a step of `max_num_tokens` could reach, in queue order: vLLM
    gives each min(need, tokens left), so none after those whose needs add up to the step's
    tokens gets one, and `plan_step` plans the same without them. NOTE: consumed lazily: the
    scheduler prices a waiting request after its prefix-cache hit, a walk over its blocks
    (~190 for a 3,000-token prompt), and the pump keeps up to 1.5x the batch's seats of
    offline requests in flight."""
    reachable, num_tokens, requests = [], 0, iter(waiting)
    while num_tokens < max_num_tokens and (request := next(requests, None)) is not None:
        reachable.append(request)
        num_tokens += request.num_new_tokens
    return reachable


def _decodes_cost(offline: Sequence[Pending], model: LatencyModel) -> float:
    """What the running offline decodes add to a step. NOTE: an offline-only step sized for
    throughput (layer-wise preemption) carries them on top of its prefill work: each decode
    is one token a step, whatever the step, and held inside the prefill-sized budget they
    would crowd out the chunk it is sized for (more, smaller steps: more fixed costs; a
    generation-heavy batch ran 13% slower than under vLLM's own priority scheduling). Beside
    a chunk: their terms and the mixed batch's own cost."""
    contexts = tuple(r.num_context for r in offline if r.running and r.decode)
    chunk = StepShape((ChunkShape(1, 0),))
    return model.predict(chunk.with_decodes(contexts)) - model.predict(chunk) if contexts else 0.0


def _ttft_chunk(request: Pending, targets: Targets) -> int:
    """The smallest chunk that still finishes the prompt within the TTFT target if every step
    takes the TBT target: its (tbt / ttft) share of the prompt."""
    num_prompt = request.num_context + request.num_new_tokens
    return max(1, math.ceil(num_prompt * targets.tbt_s / targets.ttft_s))


def _least_contexts(requests: Sequence[Pending]) -> dict[tuple[bool, bool], int]:
    """The least context of the requests of each kind, (decode, prompt logprobs)."""
    least: dict[tuple[bool, bool], int] = {}
    for r in requests:
        kind = (r.decode, r.prompt_logprobs)
        least[kind] = min(least.get(kind, r.num_context), r.num_context)
    return least


def _decodes_first(requests: Sequence[Pending]) -> list[Pending]:
    """vLLM's order with decodes moved ahead of prefills among the running requests."""
    running = [r for r in requests if r.running]
    return ([r for r in running if r.decode] + [r for r in running if not r.decode]
            + [r for r in requests if not r.running])


class _Step:
    """The step being planned: its shape so far and the tokens still available."""

    def __init__(self, model: LatencyModel, max_num_tokens: int):
        self.model, self.num_tokens_left = model, max_num_tokens
        self.shape = StepShape()
        self.entries: list[tuple[str, int]] = []
        # (budget, decode, prompt logprobs) -> the least context at which no token fits the
        # shape so far: a token costs no less at a longer context (coefficients >= 0)
        self._priced_out: dict[tuple[float, bool, bool], int] = {}

    def add(self, request: Pending, num: int) -> None:
        if num <= 0:
            return
        if request.decode:
            self.shape = self.shape.with_decodes([request.num_context] * num)
        else:
            self.shape = self.shape.with_chunk(
                ChunkShape(num, request.num_context, request.prompt_logprobs))
        self.entries.append((request.request_id, num))
        self.num_tokens_left -= num
        self._priced_out.clear()

    def fit(self, request: Pending, budget_s: float, least_context: int = 0) -> int:
        """The most tokens of `request` (up to its need) that keep the step within budget.
        `least_context`: the least of the requests of its kind still to come, priced out
        with it if no token of theirs fits either.

        NOTE: a step with online work defers each running offline request (64 of them under
        a batch): priced one by one, they took longer than the rest of the scheduler's step."""
        limit = min(request.num_new_tokens, self.num_tokens_left)
        key = (budget_s, request.decode, request.prompt_logprobs)
        if limit <= 0 or request.num_context >= self._priced_out.get(key, math.inf):
            return 0
        num = self._fit(request, budget_s, limit)
        if num == 0:
            least = min(least_context, request.num_context)
            if least < request.num_context and self._fit(replace(request, num_context=least), budget_s, 1):
                least = request.num_context  # NOTE: one of less context still fits
            self._priced_out[key] = least
        return num

    def _fit(self, request: Pending, budget_s: float, limit: int) -> int:
        if request.decode:
            return self.model.max_decodes_within(budget_s, self.shape, request.num_context,
                                                 max_decodes=limit)
        return self.model.max_tokens_within(budget_s, self.shape, request.num_context,
                                            request.prompt_logprobs, max_tokens=limit)


def offline_to_preempt(num_free_blocks: int, num_blocks_needed: int,
                       offline_blocks: Sequence[tuple[str, int]],
                       num_free_seats: int = 1) -> list[str]:
    """Offline requests to preempt so that the next waiting online request finds KV blocks
    and a seat in the batch (vLLM's `max_num_seqs`).

    `offline_blocks` lists running offline requests with the blocks each holds, in the order
    to give them up (lowest priority, latest arrival first, as vLLM picks its own victims).
    Online requests are never listed: none is preempted while an offline one holds blocks.
    """
    victims = []
    for request_id, num_blocks in offline_blocks:
        if num_free_blocks >= num_blocks_needed and num_free_seats >= 1:
            break
        victims.append(request_id)
        num_free_blocks += num_blocks
        num_free_seats += 1
    return victims


@dataclass(frozen=True)
class PolicyConfig:
    """What the engine-side scheduler needs: targets and the latency model. It travels to the
    engine process in vLLM's `additional_config["conserve"]["policy"]` as plain JSON."""

    targets: Targets
    model: LatencyModel
    batch_apart: bool = False  # offline requests never share a step with online ones
    # plan against this quantile of each step kind's live time (`refit.TailMargin`); None: the mean
    tail_quantile: float | None = DEFAULT_TAIL_QUANTILE

    def __post_init__(self) -> None:
        check_tail_quantile(self.tail_quantile)

    def to_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.to_dict(), "latency_model": self.model.to_dict(),
                "batch_apart": self.batch_apart, "tail_quantile": self.tail_quantile}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        return cls(Targets.from_dict(data["targets"]), LatencyModel.from_dict(data["latency_model"]),
                   bool(data.get("batch_apart", False)), data.get("tail_quantile", DEFAULT_TAIL_QUANTILE))
