"""The ConServe policy as pure functions: budgets, online first, offline progress, and that
vLLM's own greedy fill reproduces every plan. No torch, no vLLM."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.sched.latency import ChunkShape, LatencyModel, StepShape
from conserve_bench.sched.policy import (
    Pending,
    PolicyConfig,
    PolicyError,
    HARM_BOUND,
    MIN_SLOWDOWN,
    StepPlan,
    Targets,
    default_targets,
    derived_max_slowdown,
    offline_to_preempt,
    plan_step,
    within_reach,
)

# Coefficients fitted on this 2-core CPU with SmolLM2-135M (README, latency model).
CPU_MODEL = LatencyModel((0.0389, 0.00203, 0.00213, 4.5e-6, 0.82e-6, 0.00067, 0.005))
TARGETS = Targets(ttft_s=2.0, tbt_s=0.2)
MAX_TOKENS = 4096


def decode(request_id, context=300):
    return Pending(request_id, 1, context, decode=True)


def prefill(request_id, num_tokens, context=0, running=False, logprobs=False):
    return Pending(request_id, num_tokens, context, prompt_logprobs=logprobs, running=running)


def tokens(plan: StepPlan) -> dict[str, int]:
    return dict(plan.num_tokens)


def test_online_first_then_offline_up_to_the_tbt_budget():
    online = [decode("on-1"), decode("on-2")]
    offline = [decode("off-1"), prefill("off-2", 600, context=450)]
    plan = plan_step(online, offline, CPU_MODEL, TARGETS, MAX_TOKENS)

    assert plan.kind == "mixed"
    assert plan.num_tokens[:2] == (("on-1", 1), ("on-2", 1))
    assert plan.budget_s == pytest.approx(0.2 * 0.9)
    assert plan.predicted_s <= plan.budget_s
    chunk = tokens(plan)["off-2"]
    assert 0 < chunk < 600
    one_more = plan.shape.with_chunk(ChunkShape(1, 450 + chunk))
    assert CPU_MODEL.predict(one_more) > plan.budget_s  # the chunk is as large as fits


def test_a_long_online_prompt_is_chunked_while_online_decodes_wait():
    online = [prefill("on-new", 1000), decode("on-1")]  # the decode is planned first
    plan = plan_step(online, [decode("off-1")], CPU_MODEL, TARGETS, MAX_TOKENS)

    fits = CPU_MODEL.max_tokens_within(TARGETS.mixed_budget_s,
                                       StepShape(decode_context_lens=(300,)), 0)
    ttft_share = math.ceil(1000 * TARGETS.tbt_s / TARGETS.ttft_s)  # 100 tokens
    assert plan.num_tokens == (("on-1", 1), ("on-new", max(fits, ttft_share)))
    assert plan.deferred_ids == {"off-1"}  # the step is full: offline waits
    alone = plan_step([prefill("on-new", 1000)], [], CPU_MODEL, TARGETS, MAX_TOKENS)
    assert tokens(alone) == {"on-new": 1000}  # nothing waits on it: no chunking


def test_a_throughput_sized_offline_step_carries_every_running_decode_beside_its_chunk():
    """Under layer-wise preemption an offline-only step is sized for throughput: the running
    offline decodes ride on top of the prefill chunk the budget is sized for, never crowd it
    out (64 decodes alone would fill a 0.2 s step on this model)."""
    targets = Targets(ttft_s=2.0, tbt_s=0.2, offline_step_s=0.2)
    offline = [decode(f"d{i}") for i in range(64)] + [prefill("p", 700)]
    plan = plan_step([], offline, CPU_MODEL, targets, MAX_TOKENS)

    assert all(tokens(plan)[f"d{i}"] == 1 for i in range(64)) and not plan.deferred_ids
    alone = plan_step([], [prefill("p", 700)], CPU_MODEL, targets, MAX_TOKENS)
    assert tokens(plan)["p"] == tokens(alone)["p"] > 0  # the chunk a prefill-only step gets
    chunk = StepShape((ChunkShape(tokens(alone)["p"], 0),))  # the decodes' terms and the mixed batch's
    assert plan.budget_s == pytest.approx(0.2 + CPU_MODEL.predict(chunk.with_decodes((300,) * 64))
                                          - CPU_MODEL.predict(chunk))


def test_offline_only_steps_are_capped_by_the_quantum():
    offline = [prefill(f"off-{i}", 700) for i in range(8)]
    plan = plan_step([], offline, CPU_MODEL, TARGETS, MAX_TOKENS)

    assert plan.kind == "offline"
    assert plan.budget_s == pytest.approx(TARGETS.offline_budget_s) == pytest.approx(0.5)
    assert 0 < plan.token_budget < 700
    assert plan.predicted_s <= plan.budget_s


def test_offline_waits_when_online_work_fills_the_step():
    online = [prefill("on-1", 2000)]  # a long online prefill: far over the TBT target alone
    plan = plan_step(online, [decode("off-1"), prefill("off-2", 100)], CPU_MODEL, TARGETS,
                     MAX_TOKENS)

    assert tokens(plan) == {"on-1": 2000}
    assert plan.kind == "online"
    assert plan.deferred_ids == {"off-1"}


def test_a_running_offline_chunk_is_never_cut_ahead_of_waiting_online_work():
    online = [prefill("on-new", 20)]  # waiting: vLLM takes it after every running request
    offline = [prefill("off-run", 500, context=100, running=True), prefill("off-wait", 500)]
    plan = plan_step(online, offline, CPU_MODEL, TARGETS, MAX_TOKENS)

    assert "off-run" in plan.deferred_ids
    assert tokens(plan)["on-new"] == 20
    assert 0 < tokens(plan)["off-wait"] < 500  # the waiting one comes last: it may be cut


def test_batched_apart_offline_waits_for_every_online_request_then_runs_alone():
    online = [decode("on-1")]
    offline = [decode("off-1"), prefill("off-2", 600, context=450, running=True), prefill("off-3", 50)]
    held = plan_step(online, offline, CPU_MODEL, TARGETS, MAX_TOKENS, batch_apart=True)
    assert tokens(held) == {"on-1": 1} and held.kind == "online"
    assert held.deferred_ids == {"off-1", "off-2"}  # running ones skip the step, keeping their blocks
    mixed = plan_step(online, offline, CPU_MODEL, TARGETS, MAX_TOKENS)
    assert set(tokens(mixed)) > {"on-1"}  # the same queues, not batched apart: offline fills in
    alone = plan_step([], offline, CPU_MODEL, TARGETS, MAX_TOKENS, batch_apart=True)
    assert alone.kind == "offline" and tokens(alone) == tokens(plan_step([], offline, CPU_MODEL,
                                                                        TARGETS, MAX_TOKENS))


def test_offline_progresses_when_even_one_token_is_over_the_quantum():
    slow = LatencyModel((1.0, 0, 0, 0, 0, 0, 0.0))  # every step takes 1 s: over any quantum
    plan = plan_step([], [prefill("off", 100)], slow, Targets(ttft_s=1.0, tbt_s=0.1), MAX_TOKENS)
    assert tokens(plan) == {"off": 1}


def test_default_targets_come_from_the_profile():
    targets = default_targets(CPU_MODEL)
    decode_s = CPU_MODEL.predict(StepShape(decode_context_lens=(512,)))
    prefill_s = CPU_MODEL.predict(StepShape(prefills=(ChunkShape(1024, 0),)))
    assert targets.tbt_s == pytest.approx(5 * decode_s)
    assert targets.ttft_s == pytest.approx(2 * prefill_s)
    assert targets.offline_budget_s == pytest.approx(0.25 * targets.ttft_s)
    assert default_targets(CPU_MODEL, quantum_s=0.05).offline_budget_s == 0.05


@pytest.mark.parametrize("kwargs", [dict(ttft_s=0, tbt_s=0.1), dict(ttft_s=1, tbt_s=-1),
                                    dict(ttft_s=1, tbt_s=0.1, margin=1.0),
                                    dict(ttft_s=1, tbt_s=0.1, quantum_s=0),
                                    dict(ttft_s=1, tbt_s=0.1, max_slowdown=0),
                                    dict(ttft_s=1, tbt_s=0.1, reference_prompt_tokens=0)])
def test_bad_targets_are_refused(kwargs):
    with pytest.raises(PolicyError):
        Targets(**kwargs)


def test_policy_config_round_trips_as_json_data():
    config = PolicyConfig(Targets(1.5, 0.15, margin=0.2, quantum_s=0.1), CPU_MODEL)
    assert PolicyConfig.from_dict(config.to_dict()) == config
    apart = PolicyConfig(Targets(1.5, 0.15), CPU_MODEL, batch_apart=True)
    assert PolicyConfig.from_dict(apart.to_dict()) == apart
    bounded = PolicyConfig(Targets(1.5, 0.15, max_slowdown=0.2, reference_prompt_tokens=100), CPU_MODEL)
    assert PolicyConfig.from_dict(bounded.to_dict()) == bounded


# -- the bounded mode (the default without SLOs) ----------------------------------------------

BOUNDED = Targets(ttft_s=2.0, tbt_s=0.2, max_slowdown=0.2, reference_prompt_tokens=256)


def test_the_share_is_the_bounds_against_the_tail_and_less_the_model_error_on_the_mean():
    assert derived_max_slowdown(0.5) == derived_max_slowdown(None) == pytest.approx(HARM_BOUND - 1)
    assert (1 + derived_max_slowdown(0.01, against_tail=False)) * 1.01 == pytest.approx(HARM_BOUND)
    assert derived_max_slowdown(None, False) == derived_max_slowdown(0.05, False) == MIN_SLOWDOWN
    assert derived_max_slowdown(0.5, against_tail=False) == MIN_SLOWDOWN  # offline work still progresses


def test_bounded_offline_adds_at_most_the_share_to_online_decodes():
    online = [decode("on-1"), decode("on-2")]
    plan = plan_step(online, [prefill("off", 600)], CPU_MODEL, BOUNDED, MAX_TOKENS)
    alone = CPU_MODEL.predict(StepShape(decode_context_lens=(300, 300)))
    assert plan.kind == "mixed" and plan.budget_s == pytest.approx(1.2 * alone)
    assert alone < plan.predicted_s <= 1.2 * alone


def test_bounded_online_prompts_run_as_vllm_alone_and_get_no_offline_company():
    online = [prefill("on-new", 1000), decode("on-1")]
    plan = plan_step(online, [decode("off-1"), prefill("off-2", 50)], CPU_MODEL, BOUNDED, MAX_TOKENS)
    assert plan.num_tokens == (("on-1", 1), ("on-new", 1000))  # not chunked, as vLLM alone
    assert plan.deferred_ids == {"off-1"} and plan.kind == "online"


def test_bounded_offline_only_steps_are_a_share_of_the_reference_prefill():
    plan = plan_step([], [prefill(f"off-{i}", 700) for i in range(4)], CPU_MODEL, BOUNDED, MAX_TOKENS)
    reference = CPU_MODEL.predict(StepShape((ChunkShape(256, 0),)))
    assert plan.budget_s == pytest.approx(0.2 * reference)
    assert 0 < plan.token_budget and plan.predicted_s <= plan.budget_s
    given = Targets(2.0, 0.2, quantum_s=0.05, max_slowdown=0.2)
    assert plan_step([], [prefill("off", 700)], CPU_MODEL, given, MAX_TOKENS).budget_s == 0.05
    assert "bounded" in BOUNDED.describe(CPU_MODEL) and "20%" in BOUNDED.describe(CPU_MODEL)


def test_a_bounded_quantum_below_a_steps_fixed_cost_is_added_to_it_not_one_token_a_step():
    model = LatencyModel((0.033, 0.0007, 0.0011, 0.0, 0.0, 0.0, 0.0))  # 33 ms fixed, as on a 2-core CPU
    tight = Targets(2.0, 0.2, max_slowdown=0.05, reference_prompt_tokens=256)
    share_of_reference = 0.05 * model.predict(StepShape((ChunkShape(256, 0),)))  # about 10 ms
    smallest = model.predict(StepShape((ChunkShape(1, 0),)))
    assert share_of_reference < smallest
    plan = plan_step([], [prefill("off", 700)], model, tight, MAX_TOKENS)
    assert plan.budget_s == pytest.approx(smallest + share_of_reference)
    assert tokens(plan)["off"] > 10  # not one token for a whole step's fixed cost
    assert "on top of a step's fixed cost" in tight.describe(model)


def test_kv_pressure_preempts_offline_until_online_fits():
    held = [("off-late", 3), ("off-mid", 2), ("off-early", 4)]
    assert offline_to_preempt(10, 4, held) == []
    assert offline_to_preempt(1, 4, held) == ["off-late"]
    assert offline_to_preempt(0, 4, held) == ["off-late", "off-mid"]
    assert offline_to_preempt(0, 100, held) == ["off-late", "off-mid", "off-early"]
    assert offline_to_preempt(10, 4, held, num_free_seats=0) == ["off-late"]  # a batch seat


# -- properties -------------------------------------------------------------------------------

coefficients = st.tuples(*[st.floats(0, scale) for scale in (0.05, 0.005, 0.005, 1e-5, 2e-6, 2e-3, 0.01)])


@st.composite
def requests(draw, prefix: str):
    num = draw(st.integers(0, 6))
    out = []
    for i in range(num):
        running = draw(st.booleans())
        if running and draw(st.booleans()):
            out.append(Pending(f"{prefix}{i}", 1, draw(st.integers(1, 2000)), decode=True))
        else:
            out.append(Pending(f"{prefix}{i}", draw(st.integers(1, 1500)), draw(st.integers(0, 1500)),
                               prompt_logprobs=draw(st.booleans()), running=running))
    # vLLM's order: running requests first, then waiting ones
    return [r for r in out if r.running] + [r for r in out if not r.running]


slowdowns = st.none() | st.floats(0.01, 0.5)
plans = st.tuples(requests("on-"), requests("off-"), coefficients, st.floats(0.01, 3.0),
                  st.floats(0.005, 0.5), st.integers(1, 4096), slowdowns, st.integers(1, 2048))


def make_plan(online, offline, coeffs, ttft_s, tbt_s, max_tokens, max_slowdown, reference):
    model = LatencyModel(coeffs)
    targets = Targets(ttft_s, tbt_s, max_slowdown=max_slowdown, reference_prompt_tokens=reference)
    return plan_step(online, offline, model, targets, max_tokens), model


@settings(max_examples=300, deadline=None)
@given(plans)
def test_no_step_exceeds_its_budget(case):
    online, offline, *_ = case
    plan, model = make_plan(*case)
    assert plan.token_budget <= case[5]
    assert math.isclose(plan.predicted_s, model.predict(shape_of(plan, [*online, *offline])))
    minimum_progress = not online and [n for _, n in plan.num_tokens] == [1]
    if plan.num_offline_tokens and not minimum_progress:
        assert plan.predicted_s <= plan.budget_s * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(plans)
def test_online_work_is_never_starved(case):
    online, offline, *rest = case
    plan, _ = make_plan(*case)
    alone, _ = make_plan(online, [], *rest)
    online_ids = {r.request_id for r in online}
    assert [e for e in plan.num_tokens if e[0] in online_ids] == list(alone.num_tokens)
    assert plan.num_online_tokens == alone.token_budget
    assert not plan.deferred_ids & online_ids


@settings(max_examples=300, deadline=None)
@given(plans)
def test_offline_work_progresses_when_online_is_idle(case):
    online, offline, *rest = case
    if offline:
        plan, _ = make_plan([], offline, *rest)
        assert plan.num_offline_tokens >= 1
        assert plan.kind == "offline"


@settings(max_examples=300, deadline=None)
@given(plans)
def test_vllms_greedy_fill_reproduces_the_plan(case):
    """What ConserveScheduler makes vLLM do: running requests in plan order minus the deferred
    ones, then the waiting queue (online first), each taking min(need, budget left)."""
    online, offline, *_ = case
    plan, _ = make_plan(*case)
    rank = {request_id: i for i, (request_id, _) in enumerate(plan.num_tokens)}
    running = sorted((r for r in online + offline if r.running),
                     key=lambda r: rank.get(r.request_id, len(rank)))
    waiting = [r for r in online + offline if not r.running]
    budget, filled = plan.token_budget, {}
    for request in running + waiting:
        if request.request_id in plan.deferred_ids or budget == 0:
            continue
        filled[request.request_id] = min(request.num_new_tokens, budget)
        budget -= filled[request.request_id]
    assert filled == tokens(plan)


@settings(max_examples=300, deadline=None)
@given(plans)
def test_waiting_requests_past_the_steps_tokens_change_no_plan(case):
    """The scheduler prices only the waiting requests a step could reach: vLLM gives each
    min(need, tokens left), so those past the step's tokens get none."""
    online, offline, *rest = case
    max_tokens = rest[3]
    waiting = within_reach([r for r in online + offline if not r.running], max_tokens)
    assert sum(r.num_new_tokens for r in waiting[:-1]) < max_tokens
    reached = [r for r in online + offline if r.running] + waiting
    plan, _ = make_plan(*case)
    assert make_plan([r for r in reached if r in online], [r for r in reached if r in offline],
                     *rest)[0] == plan


def test_within_reach_stops_at_the_request_that_fills_the_step():
    queue = [prefill("a", 30), prefill("b", 70), prefill("c", 5)]
    assert [r.request_id for r in within_reach(queue, 100)] == ["a", "b"]
    assert [r.request_id for r in within_reach(queue, 101)] == ["a", "b", "c"]
    assert [r.request_id for r in within_reach(iter(queue), 20)] == ["a"]


def _priced_one_by_one(step, request, budget_s, least_context=0):
    """`_Step.fit` without what it knows from earlier requests: each one priced in full."""
    limit = min(request.num_new_tokens, step.num_tokens_left)
    return step._fit(request, budget_s, limit) if limit > 0 else 0


@settings(max_examples=300, deadline=None)
@given(plans)
def test_requests_priced_out_by_earlier_ones_get_what_pricing_each_gives(case):
    from unittest import mock

    from conserve_bench.sched import policy

    plan, _ = make_plan(*case)
    with mock.patch.object(policy._Step, "fit", _priced_one_by_one):
        priced_each, _ = make_plan(*case)
    assert plan == priced_each


def test_offline_requests_that_cannot_fit_are_priced_out_together():
    """A step with online work defers its running offline decodes: the step prices the one
    of least context once, not each of them (64 under a batch)."""
    from unittest import mock

    online = [Pending("on", 1, 300, decode=True)]
    offline = [Pending(f"off-{i}", 1, 500 - i, decode=True) for i in range(64)]  # contexts fall
    targets = Targets(ttft_s=2.0, tbt_s=0.2, max_slowdown=0.01)
    with mock.patch.object(LatencyModel, "max_decodes_within", autospec=True,
                           side_effect=LatencyModel.max_decodes_within) as priced:
        plan = plan_step(online, offline, CPU_MODEL, targets, MAX_TOKENS)
    assert plan.num_tokens == (("on", 1),) and len(plan.deferred_ids) == 64
    assert priced.call_count == 2  # the first, then the least context: neither fits

    # with room for a short decode (~2.6 ms here) but not for long ones (~11 ms at 2,000)
    offline = [Pending("long", 1, 2000, decode=True), Pending("short", 1, 100, decode=True),
               Pending("longer", 1, 1800, decode=True)]
    plan = plan_step(online, offline, CPU_MODEL, replace(targets, max_slowdown=0.15), MAX_TOKENS)
    assert plan.num_tokens == (("on", 1), ("short", 1)) and plan.deferred_ids == {"long", "longer"}


def shape_of(plan: StepPlan, requests) -> StepShape:
    """The shape of the plan's part made of `requests` (its online part, or all of it), built
    from what it gives each request, not from the plan's own shape."""
    by_id = {r.request_id: r for r in requests}
    shape = StepShape()
    for request_id, num in plan.num_tokens:
        if request_id in by_id:
            r = by_id[request_id]
            shape = (shape.with_decodes([r.num_context]) if r.decode else
                     shape.with_chunk(ChunkShape(num, r.num_context, r.prompt_logprobs)))
    return shape


bounded_plans = plans.filter(lambda case: case[6] is not None)


@settings(max_examples=300, deadline=None)
@given(bounded_plans)
def test_bounded_online_work_runs_exactly_as_vllm_would_alone(case):
    """No chunking, no reordering beyond decodes first: min(need, budget left) in order."""
    online, _, *rest = case
    plan, _ = make_plan(*case)
    left, expected = rest[3], []
    for request in [r for r in online if r.running and r.decode] + [
            r for r in online if r.running and not r.decode] + [r for r in online if not r.running]:
        num = min(request.num_new_tokens, left)
        if num:
            expected.append((request.request_id, num))
        left -= num
        if num < request.num_new_tokens:
            break
    online_ids = {r.request_id for r in online}
    assert [e for e in plan.num_tokens if e[0] in online_ids] == expected


@settings(max_examples=300, deadline=None)
@given(bounded_plans)
def test_bounded_harm_holds_in_the_model(case):
    """Every step with online work is predicted at most (1 + share) x its online part, and
    exactly its online part when that carries a prompt; an offline-only step at most the share
    of the reference prefill, hence of the prefill of any arrival at least as long (on top of
    the smallest step's cost where the share is below it: no step costs less)."""
    online, offline, coeffs, *_, share, reference = case
    plan, model = make_plan(*case)
    slack = 1 + 1e-9
    if online:
        part = shape_of(plan, online)
        assert plan.predicted_s <= (1 + share) * model.predict(part) * slack
        if part.prefills:
            assert plan.predicted_s <= model.predict(part) * slack
    elif plan.num_offline_tokens > 1:
        smallest = model.predict(StepShape((ChunkShape(1, 0),)))
        floor = smallest if share * model.predict(StepShape((ChunkShape(reference, 0),))) < smallest else 0.0
        for arrival in (reference, reference + 1, 2 * reference):
            own_prefill = model.predict(StepShape((ChunkShape(arrival, 0),)))
            assert plan.predicted_s <= (floor + share * own_prefill) * slack
