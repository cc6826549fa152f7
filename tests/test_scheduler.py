"""ConserveScheduler's adapter layer, without an engine: the vLLM 0.32.0 names it relies on
(fails loudly when an upgrade moves one) and how it reads a scheduled step."""

from __future__ import annotations

import inspect
import json
import time
from types import SimpleNamespace

import pytest

from conserve_bench.sched.latency import ChunkShape, LatencyModel
from conserve_bench.sched.policy import PolicyConfig, Targets
from conserve_bench.sched.refit import RefitStatus
from conserve_bench.vllm_plugin.overrides import SCHEDULER_CLS
from conserve_bench.sched.steplog import step_shape


def test_scheduler_cls_resolves_to_a_vllm_scheduler_subclass():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.scheduler import Scheduler

    from conserve_bench.vllm_plugin.scheduler import ConserveScheduler

    assert resolve_obj_by_qualname(SCHEDULER_CLS) is ConserveScheduler
    assert issubclass(ConserveScheduler, Scheduler)


def test_vllm_scheduler_names():
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert list(inspect.signature(Scheduler.schedule).parameters) == ["self", "throttle_prefills"]
    assert list(inspect.signature(Scheduler.update_from_output).parameters) == [
        "self", "scheduler_output", "model_runner_output"]
    assert list(inspect.signature(Scheduler.add_request).parameters) == ["self", "request"]
    assert callable(Scheduler.shutdown)
    assert "num_scheduled_tokens" in SchedulerOutput.__dataclass_fields__
    assert "additional_config" in VllmConfig.__dataclass_fields__
    request_init = inspect.getsource(Request.__init__)
    for name in ("self.num_prompt_tokens", "self.num_computed_tokens", "self.sampling_params"):
        assert name in request_init, f"Request {name} moved"


def test_vllm_advances_computed_tokens_at_the_end_of_schedule():
    """ConserveScheduler reads a request's context as num_computed_tokens minus this step's."""
    from vllm.v1.core.sched.scheduler import Scheduler

    schedule = inspect.getsource(Scheduler.schedule)
    assert schedule.rstrip().endswith("return scheduler_output")
    tail = schedule[schedule.rindex("self._update_after_schedule(scheduler_output)"):]
    assert tail.count("\n") <= 2, "something runs after _update_after_schedule in schedule()"
    assert "request.num_computed_tokens += num_scheduled_token" in inspect.getsource(
        Scheduler._update_after_schedule)


def test_engine_core_step_schedules_then_updates_from_output():
    from vllm.v1.engine.core import EngineCore

    for step in (EngineCore.step, EngineCore.step_with_batch_queue):
        source = inspect.getsource(step)
        assert 0 < source.index("self.scheduler.schedule(") < source.index(
            "self.scheduler.update_from_output(")
    # Requests aborted while a step runs leave `Scheduler.requests` before update_from_output,
    # which is how ConserveScheduler keeps such a step out of the live refit.
    source = inspect.getsource(EngineCore.step)
    assert source.index("self._process_aborts_queue()") < source.index(
        "self.scheduler.update_from_output(")


def test_vllm_cpu_runs_without_a_batch_queue():
    """On CPU a step is timed from schedule() to update_from_output() with nothing overlapped."""
    from vllm.platforms.cpu import CpuPlatform

    assert "scheduler_config.async_scheduling = False" in inspect.getsource(
        CpuPlatform.check_and_update_config)


def test_scheduled_requests_read_the_context_before_the_step():
    from conserve_bench.vllm_plugin.scheduler import ConserveScheduler

    def request(num_computed, num_prompt, prompt_logprobs=None):
        return SimpleNamespace(num_computed_tokens=num_computed, num_prompt_tokens=num_prompt,
                               sampling_params=SimpleNamespace(prompt_logprobs=prompt_logprobs))

    scheduler = object.__new__(ConserveScheduler)  # no engine: only `requests` is read
    # As vLLM leaves them after schedule(): computed tokens already include this step's.
    scheduler.requests = {"a": request(256, 256), "b": request(65, 64), "c": request(512, 1024, 1)}
    output = SimpleNamespace(num_scheduled_tokens={"a": 256, "b": 1, "c": 256})
    shape = step_shape(ConserveScheduler._scheduled_requests(scheduler, output))
    assert shape.prefills == (ChunkShape(256, 0), ChunkShape(256, 256, prompt_logprobs=True))
    assert shape.decode_context_lens == (64,)


# -- the policy carried out by vLLM's real scheduler (no model: outputs are one fixed token) -----

CPU_MODEL = LatencyModel((0.0389, 0.00203, 0.00213, 4.5e-6, 0.82e-6, 0.00067, 0.005))
POLICY = PolicyConfig(Targets(ttft_s=2.0, tbt_s=0.2), CPU_MODEL)


def make_scheduler(model_path: str, policy: PolicyConfig | None, num_blocks: int = 256,
                   max_num_batched_tokens: int = 2048, cls=None, **conserve):
    """A ConserveScheduler (or `cls`) as EngineCore builds it, over `num_blocks` KV blocks;
    `conserve` adds entries to its plug-in config."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.structured_output import StructuredOutputManager

    from conserve_bench.vllm_plugin.scheduler import ConserveScheduler

    additional = {"conserve": {"policy": policy.to_dict(), **conserve}} if policy else {}
    config = EngineArgs(model=model_path, max_model_len=2048, max_num_seqs=16,
                        max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=True,
                        scheduling_policy="priority", additional_config=additional,
                        dtype="float32").create_engine_config()
    config.cache_config.num_gpu_blocks = num_blocks
    block_size = config.cache_config.block_size
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=64,
                             dtype=torch.float32)
    kv_cache = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                             kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    scheduler = (cls or ConserveScheduler)(
        vllm_config=config, kv_cache_config=kv_cache, block_size=block_size, log_stats=False,
        structured_output_manager=StructuredOutputManager(config))
    # As EngineCore does for prefix caching: every request hashes its full blocks.
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    scheduler.test_block_hasher = get_request_block_hasher(block_size, hash_fn)
    return scheduler


def add(scheduler, request_id: str, num_prompt: int, priority: int, max_tokens: int = 8,
        first_token: int = 0, extra_args: dict | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    prompt = [(first_token + i) % 5000 + 10 for i in range(num_prompt)]
    scheduler.add_request(Request(request_id, prompt_token_ids=prompt, pooling_params=None,
                                  sampling_params=SamplingParams(max_tokens=max_tokens,
                                                                 ignore_eos=True,
                                                                 extra_args=extra_args),
                                  priority=priority, block_hasher=scheduler.test_block_hasher))


def run_step(scheduler):
    """schedule() then update_from_output() with token 7 for every request past its prompt."""
    from vllm.v1.outputs import ModelRunnerOutput

    output = scheduler.schedule()
    req_ids = list(output.num_scheduled_tokens)
    sampled = [[7] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_prompt_tokens
               else [] for r in req_ids]
    scheduler.update_from_output(output, ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled))
    return output


@pytest.fixture(scope="module")
def model_path(model_ref):
    return model_ref.path


def test_vllm_carries_out_every_plan_exactly(model_path):
    scheduler = make_scheduler(model_path, POLICY)
    for i in range(6):
        add(scheduler, f"off-{i}", 700, priority=1, max_tokens=4, first_token=1000 * i)
    kinds = []
    for step in range(60):
        if step == 5:
            add(scheduler, "on-0", 300, priority=0, max_tokens=20)
        if step == 12:
            add(scheduler, "on-1", 40, priority=0, max_tokens=20)
        output = run_step(scheduler)
        plan = scheduler.last_plan
        assert dict(output.num_scheduled_tokens) == dict(plan.num_tokens), step
        if plan.num_offline_tokens and plan.kind == "mixed":
            assert plan.predicted_s <= POLICY.targets.mixed_budget_s
        kinds.append(plan.kind)
    assert {"offline", "mixed"} <= set(kinds)
    assert not scheduler.requests or all(r.startswith("off") for r in scheduler.requests)


def test_waiting_offline_work_is_priced_after_its_prefix_hit_up_to_the_steps_tokens(model_path):
    """A waiting request is priced at its prefix-cache hit (a walk over its blocks), and only
    those the step's tokens could reach are (`policy.within_reach`)."""
    scheduler = make_scheduler(model_path, POLICY, max_num_batched_tokens=2048)
    add(scheduler, "done", 700, priority=1, max_tokens=1)
    while scheduler.requests:
        run_step(scheduler)
    add(scheduler, "hit", 700, priority=1)  # the finished request's prompt: cached
    for i in range(12):
        add(scheduler, f"off-{i:02d}", 700, priority=1, first_token=1000 * (i + 1))
    add(scheduler, "on", 100, priority=0, first_token=4321)
    lookups = []
    get_computed_blocks = scheduler.kv_cache_manager.get_computed_blocks
    scheduler.kv_cache_manager.get_computed_blocks = lambda r: lookups.append(r.request_id) or get_computed_blocks(r)
    online, offline = scheduler._pending()
    num_hit = 699 // scheduler.block_size * scheduler.block_size
    assert [p.request_id for p in online] == ["on"]
    # 100 online tokens, 700 - num_hit, then 700 a request until the step's 2048 are reached
    assert [(p.request_id, p.num_context) for p in offline] == [
        ("hit", num_hit), ("off-00", 0), ("off-01", 0), ("off-02", 0)]
    assert lookups == ["on", "hit", "off-00", "off-01", "off-02"]


def test_online_arrival_is_scheduled_in_the_next_step(model_path):
    scheduler = make_scheduler(model_path, POLICY)
    for i in range(4):
        add(scheduler, f"off-{i}", 1500, priority=1, first_token=1000 * i)
    run_step(scheduler)
    add(scheduler, "on", 200, priority=0, first_token=4321)  # no prefix-cache hit
    output = run_step(scheduler)
    assert output.num_scheduled_tokens["on"] == 200
    assert all(not r.startswith("off") or n < 1500 for r, n in output.num_scheduled_tokens.items())


def test_offline_work_waits_for_the_online_request_whose_arrival_cut_its_step(model_path):
    """The hand-off: a step is cut when an arrival is announced, before its request reaches
    the scheduler; until it does, no step runs offline work (or one would run in front of it)."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    from conserve_bench.vllm_plugin.overrides import ARRIVAL_KEY
    from conserve_bench.vllm_plugin.preemption import LayerPreemption
    from conserve_bench.vllm_plugin.safepoints import AbortReport

    preemptive = PolicyConfig(Targets(ttft_s=2.0, tbt_s=0.2, offline_step_s=0.5), CPU_MODEL)
    scheduler = make_scheduler(model_path, preemptive)
    armed = []  # NOTE: the connector's scheduler half only passes the arming on to the worker
    scheduler._preemption = LayerPreemption(scheduler, SimpleNamespace(arm=lambda output, *_: armed.append(output)))
    for i in range(2):
        add(scheduler, f"off-{i}", 700, priority=1, first_token=1000 * i)
    cut = scheduler.schedule()
    assert armed == [cut]
    report = AbortReport(step_index=1, layer=3, num_layers=30, arrival_ns=1, num_announced=1,
                         aborted_at_ns=2, layer_group_s=0.001)
    scheduler.update_from_output(cut, ModelRunnerOutput(
        req_ids=[], req_id_to_index={}, kv_connector_output=KVConnectorOutput(kv_connector_worker_meta=report)))
    assert all(r.num_computed_tokens == 0 for r in scheduler.requests.values())  # rolled back
    for _ in range(3):  # arrival 1 is on its way
        assert run_step(scheduler).total_num_scheduled_tokens == 0
    add(scheduler, "on", 100, priority=0, first_token=4321, extra_args={ARRIVAL_KEY: 1})
    assert dict(run_step(scheduler).num_scheduled_tokens) == {"on": 100}
    assert any(r.startswith("off") for r in run_step(scheduler).num_scheduled_tokens)


def test_offline_only_steps_are_sized_by_the_arrivals_that_come_without_online_work(model_path):
    """A burst of online requests while online work runs cuts no offline step, so it does not
    shorten them; arrivals into an engine without online work do."""
    from conserve_bench.vllm_plugin.overrides import is_online

    targets = Targets(ttft_s=2.0, tbt_s=0.2, max_slowdown=0.05, offline_step_s=0.5)

    def run_online_out(scheduler):
        while any(is_online(r.priority) for r in scheduler.requests.values()):
            run_step(scheduler)

    def offline_budget_after(arrive) -> float:
        scheduler = make_scheduler(model_path, PolicyConfig(targets, CPU_MODEL))
        add(scheduler, "off", 1900, priority=1)
        run_step(scheduler)
        arrive(scheduler)
        run_online_out(scheduler)
        run_step(scheduler)
        assert scheduler.last_plan.kind == "offline"
        return scheduler.last_plan.budget_s

    def burst(scheduler):
        for i in range(6):
            add(scheduler, f"on-{i}", 50, priority=0, first_token=100 * i)
            if i == 0:
                run_step(scheduler)  # online work runs from here on

    def apart(scheduler):
        for i in range(6):
            add(scheduler, f"on-{i}", 50, priority=0, first_token=100 * i)
            run_online_out(scheduler)
            run_step(scheduler)  # an offline step between them: no online work

    assert offline_budget_after(burst) == pytest.approx(0.5)  # one arrival counted: no rate
    assert offline_budget_after(apart) < 0.1  # six within milliseconds of online-free time


def test_a_step_an_arrival_let_run_out_keeps_its_work_and_offline_work_waits_for_the_request(model_path, tmp_path):
    """Past its run-out share (what is left fits in an arrival's wait) an armed step runs to
    the end: its tokens count, the step log notes where the arrival came, and the arrival is
    settled as by a cut."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    from conserve_bench.sched.policy import run_out_share
    from conserve_bench.sched.steplog import read_step_log_with_notes
    from conserve_bench.vllm_plugin.overrides import ARRIVAL_KEY
    from conserve_bench.vllm_plugin.preemption import LayerPreemption
    from conserve_bench.vllm_plugin.safepoints import RunOutReport

    targets = Targets(ttft_s=2.0, tbt_s=0.2, max_slowdown=0.05, offline_step_s=0.5)
    scheduler = make_scheduler(model_path, PolicyConfig(targets, CPU_MODEL),
                               step_log=str(tmp_path / "steps.jsonl"))
    armed = []
    scheduler._preemption = LayerPreemption(scheduler, SimpleNamespace(
        arm=lambda output, cut_above, run_out_from, run_out_wait_s: armed.append(
            (output, run_out_from, run_out_wait_s))))
    for i in range(2):
        add(scheduler, f"off-{i}", 700, priority=1, first_token=1000 * i)
    step = scheduler.schedule()
    wait = targets.arrival_wait_s(CPU_MODEL)
    # the worker holds the step's measured pace to the same wait
    assert armed == [(step, pytest.approx(run_out_share(scheduler.last_plan.predicted_s, wait)),
                      pytest.approx(wait))]
    assert 0 < armed[0][1] < 1
    computed = {r: scheduler.requests[r].num_computed_tokens for r in step.num_scheduled_tokens}
    report = RunOutReport(step_index=1, layer=29, num_layers=30, arrival_ns=time.monotonic_ns(),
                          num_announced=1)
    req_ids = list(step.num_scheduled_tokens)
    scheduler.update_from_output(step, ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[] for _ in req_ids],
        kv_connector_output=KVConnectorOutput(kv_connector_worker_meta=report)))
    assert {r: scheduler.requests[r].num_computed_tokens for r in computed} == computed  # kept
    sample, notes = read_step_log_with_notes(tmp_path / "steps.jsonl")[0]
    assert (notes["run_out_layer"], notes["num_layers"], notes["arrival_ns"]) == (29, 30, report.arrival_ns)
    assert notes["arrival_to_end_ms"] >= 0 and "aborted" not in notes
    assert sample.shape.num_prefill_tokens == sum(step.num_scheduled_tokens.values())  # a real step
    assert run_step(scheduler).total_num_scheduled_tokens == 0  # arrival 1 is on its way
    add(scheduler, "on", 100, priority=0, first_token=4321, extra_args={ARRIVAL_KEY: 1})
    assert dict(run_step(scheduler).num_scheduled_tokens) == {"on": 100}


def test_kv_pressure_preempts_offline_never_online(model_path):
    from vllm.v1.request import RequestStatus

    scheduler = make_scheduler(model_path, POLICY, num_blocks=12)  # 12 x 128 tokens
    add(scheduler, "on-old", 200, priority=0, max_tokens=50)
    for i in range(4):
        add(scheduler, f"off-{i}", 250, priority=1, max_tokens=50, first_token=1000 * i)
    for _ in range(12):
        run_step(scheduler)
    assert all(scheduler.requests[f"off-{i}"].status == RequestStatus.RUNNING for i in range(4))

    add(scheduler, "on-new", 500, priority=0, first_token=4000)
    output = run_step(scheduler)
    assert output.num_scheduled_tokens.get("on-new", 0) > 0  # a chunk: on-old is decoding
    statuses = {r: scheduler.requests[r].status for r in scheduler.requests}
    assert statuses["on-old"] == statuses["on-new"] == RequestStatus.RUNNING
    assert RequestStatus.PREEMPTED in {statuses[f"off-{i}"] for i in range(4)}


def test_a_full_batch_of_offline_requests_makes_a_seat_for_online(model_path):
    scheduler = make_scheduler(model_path, POLICY)  # max_num_seqs=16
    for i in range(16):
        add(scheduler, f"off-{i}", 20, priority=1, max_tokens=100, first_token=1000 * i)
    for _ in range(20):
        run_step(scheduler)
    assert len(scheduler.running) == 16
    add(scheduler, "on", 50, priority=0, first_token=20000)
    assert run_step(scheduler).num_scheduled_tokens["on"] == 50
    assert sum(r.startswith("off") for r in (q.request_id for q in scheduler.running)) == 15


def test_without_a_policy_it_schedules_exactly_as_vllm(model_path):
    from vllm.v1.core.sched.scheduler import Scheduler

    plain, conserve = make_scheduler(model_path, None, cls=Scheduler), make_scheduler(model_path, None)
    for scheduler in (plain, conserve):
        for i in range(5):
            add(scheduler, f"r-{i}", 900, priority=i % 2, first_token=1000 * i)
    for _ in range(10):
        assert run_step(plain).num_scheduled_tokens == run_step(conserve).num_scheduled_tokens


def test_vllm_mechanisms_the_plan_relies_on():
    """How ConserveScheduler steers vLLM 0.32.0; an upgrade that changes one fails here."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    schedule = inspect.getsource(Scheduler.schedule)
    # A running request is skipped while current_step < next_decode_eligible_step, and
    # schedule() advances current_step first.
    assert schedule.index("self.current_step += 1") < schedule.index(
        "if self.current_step < request.next_decode_eligible_step:")
    assert "token_budget = self.max_num_scheduled_tokens" in schedule
    # Priority preemption takes the largest (priority, arrival_time) in the running list.
    assert "max(\n                            self.running,\n                            key=lambda r: (r.priority, r.arrival_time)," in schedule
    assert "self.next_decode_eligible_step = 0" in inspect.getsource(Request.__init__)
    assert list(inspect.signature(Scheduler._preempt_request).parameters)[:3] == [
        "self", "request", "timestamp"]


# -- the live latency model and the reference prompt, on vLLM's real scheduler ----------------

BOUNDED = PolicyConfig(Targets(ttft_s=2.0, tbt_s=0.2, max_slowdown=0.2), CPU_MODEL)
REFIT = {"window": 40, "every": 20, "min_samples": 20, "warmup_steps": 2}


def make_live_scheduler(model_path, tmp_path):
    """As serve configures it: the refit settings and the file the server reads."""
    from conserve_bench.sched.refit import RefitConfig

    return make_scheduler(model_path, BOUNDED, refit=RefitConfig(**REFIT).to_dict(),
                          refit_state=str(tmp_path / "refit.json"),
                          step_log=str(tmp_path / "steps.jsonl"))


def test_live_steps_refit_the_model_that_plans(model_path, tmp_path):
    from conserve_bench.sched.steplog import read_step_log_with_notes

    scheduler = make_live_scheduler(model_path, tmp_path)
    for i in range(8):
        add(scheduler, f"off-{i}", 300, priority=1, max_tokens=12, first_token=1000 * i)
    for _ in range(60):
        run_step(scheduler)
    # Without a model a step takes microseconds: the profile's 39 ms per step is far off, and
    # the refit that predicts the live steps better plans from the first refit on.
    live = scheduler.live
    assert live.status is not None and live.status.adopted and live.model is live.refit
    assert live.status.refit_error.median_rel < live.status.profile_error.median_rel
    state = json.loads((tmp_path / "refit.json").read_text())
    assert state["adopted"] and state["num_refits"] == live.status.num_refits
    steps = [notes for _, notes in read_step_log_with_notes(tmp_path / "steps.jsonl")]
    assert all("profile_predicted_s" in n for n in steps)
    assert any("refit_predicted_s" in n for n in steps) and "refit_predicted_s" not in steps[0]
    # NOTE: the step log's `predicted_s` is the refit's corrected by the step's size class
    assert live.sized.base == live.refit


def test_a_warm_start_plans_from_the_first_step_and_the_state_keeps_the_margins(model_path, tmp_path):
    """What a restarted server hands the scheduler (`refit.WarmStart`): it plans with the
    stored refit and sizes offline work with the stored margins from its first step; each
    refit it writes carries its margins, for the next one."""
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import RefitConfig, WarmStart
    from conserve_bench.sched.steplog import read_step_log_with_notes

    stored = LatencyModel(tuple(c * 1.5 for c in CPU_MODEL.coefficients))
    warm = WarmStart(stored, TailFactors(mixed=1.4, offline=1.25))
    scheduler = make_scheduler(model_path, BOUNDED, refit=RefitConfig(**REFIT).to_dict(),
                               refit_state=str(tmp_path / "refit.json"),
                               step_log=str(tmp_path / "steps.jsonl"), warm_start=warm.to_dict())
    assert scheduler.live.model == stored and scheduler.tail.factors() == warm.tail
    add(scheduler, "off-0", 300, priority=1, max_tokens=12)
    run_step(scheduler)
    (_, first), = read_step_log_with_notes(tmp_path / "steps.jsonl")
    assert first["kind"] == "offline" and first["tail_factor"] == 1.25
    assert first["predicted_s"] == pytest.approx(1.5 * first["profile_predicted_s"], rel=1e-3)
    for i in range(1, 8):
        add(scheduler, f"off-{i}", 300, priority=1, max_tokens=12, first_token=1000 * i)
    for _ in range(40):
        run_step(scheduler)
        if (tmp_path / "refit.json").exists():  # NOTE: the margins move on after a refit: compare at once
            break
    state = json.loads((tmp_path / "refit.json").read_text())
    assert WarmStart.from_status(RefitStatus.from_dict(state)).tail == scheduler.tail.factors()


def test_a_kind_a_stale_margin_locked_out_is_planned_again_once_it_ages_out(model_path):
    """A warm start's mixed margin of 3 leaves no room beside online decodes (the bounded
    share is 20%); the server's own steps take over after `TAIL_MAX_AGE_STEPS`."""
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import TAIL_MAX_AGE_STEPS, WarmStart

    warm = WarmStart(tail=TailFactors(mixed=3.0))
    scheduler = make_scheduler(model_path, BOUNDED, warm_start=warm.to_dict())
    add(scheduler, "on", 100, priority=0, max_tokens=TAIL_MAX_AGE_STEPS + 100)
    add(scheduler, "off", 1000, priority=1)
    kinds = [(run_step(scheduler), scheduler.last_plan.kind)[1]
             for _ in range(TAIL_MAX_AGE_STEPS + 20)]
    assert "mixed" not in kinds[:TAIL_MAX_AGE_STEPS]
    assert "mixed" in kinds[TAIL_MAX_AGE_STEPS:]


def test_a_step_whose_request_was_aborted_is_never_fitted_on(model_path, tmp_path):
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import RequestStatus

    scheduler = make_live_scheduler(model_path, tmp_path)
    add(scheduler, "off-0", 100, priority=1)
    for _ in range(4):
        run_step(scheduler)
    num_fitted = len(scheduler.live._window)
    output = scheduler.schedule()
    scheduler.finish_requests("off-0", RequestStatus.FINISHED_ABORTED)  # as EngineCore does
    scheduler.update_from_output(output, ModelRunnerOutput(req_ids=[], req_id_to_index={},
                                                           sampled_token_ids=[]))
    assert len(scheduler.live._window) == num_fitted


def test_the_reference_prompt_follows_recent_online_prompts(model_path, tmp_path):
    from conserve_bench.vllm_plugin.scheduler import NUM_RECENT_PROMPTS

    scheduler = make_live_scheduler(model_path, tmp_path)
    assert scheduler._targets.reference_prompt_tokens == BOUNDED.targets.reference_prompt_tokens
    sizes = [10 * n for n in (7, 19, 2, 12, 20, 5, 14, 1, 9, 16, 3, 18, 11, 6, 15, 4, 10, 13, 8, 17)]
    for i, size in enumerate(sizes):
        add(scheduler, f"on-{i}", size, priority=0, first_token=100 * i)
    add(scheduler, "off", 1000, priority=1)  # offline prompts do not count
    assert scheduler._targets.reference_prompt_tokens == 190  # 10..200: the 90th percentile of 20
    for i in range(NUM_RECENT_PROMPTS):  # as many short ones: the long ones are no longer recent
        add(scheduler, f"short-{i}", 5 + i % 3, priority=0)
    assert scheduler._targets.reference_prompt_tokens == 7
