"""The live latency model (`sched.refit`) on synthetic step streams: when it refits, what it
never fits on, that it plans only while it predicts the newest steps better, and how the
server reads what the engine wrote. No engine."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.sched.latency import (FEATURES, ChunkShape, FitError, LatencyModel, Sample, StepShape,
                                          evaluate, fit)
from conserve_bench.sched.refit import LiveModel, RefitConfig, RefitStatus

PROFILE = LatencyModel((0.02, 1e-3, 1.3e-3, 4e-6, 0.8e-6, 0.5e-3, 5e-3))
CFG = RefitConfig(window=200, every=50, min_samples=100, warmup_steps=10)


def live_shapes(num: int, seed: int = 0, logprobs: bool = False) -> list[StepShape]:
    """What a serving engine runs: decode batches, some with a prefill chunk."""
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(num):
        decodes = tuple(int(c) for c in rng.integers(32, 1024, size=rng.integers(1, 16)))
        chunks = ((ChunkShape(int(rng.integers(8, 512)), int(rng.integers(0, 512)), logprobs),)
                  if rng.random() < 0.5 else ())
        shapes.append(StepShape(chunks, decodes))
    return shapes


def steps(truth: LatencyModel, num: int, seed: int = 0, noise: float = 0.0,
          slow_share: float = 0.0) -> list[Sample]:
    rng = np.random.default_rng(seed + 100)
    samples = []
    for shape in live_shapes(num, seed):
        t = truth.predict(shape) * float(np.exp(noise * rng.standard_normal()))
        if rng.random() < slow_share:
            t *= 2.0  # another process took the CPU for this step
        samples.append(Sample(shape, t))
    return samples


def feed(live: LiveModel, samples, usable: bool = True) -> list[RefitStatus]:
    return [s for s in (live.observe(x, usable) for x in samples) if s is not None]


def test_no_refit_before_warmup_and_enough_steps_then_every_n():
    live = LiveModel(PROFILE, CFG)
    statuses = feed(live, steps(PROFILE, 10 + 99))
    assert statuses == [] and live.refit is None and live.model is PROFILE
    statuses = feed(live, steps(PROFILE, 1 + 100, seed=1))  # usable steps 100, 150, 200
    assert [s.num_refits for s in statuses] == [1, 2, 3]
    assert [s.num_steps for s in statuses] == [110, 160, 210]


def test_a_due_refit_waits_for_a_step_with_no_online_request_for_a_bounded_time():
    """A refit takes milliseconds of the engine core's: run between two online decode steps
    it lengthened every 32nd gap between an online request's tokens by 3-7 ms."""
    live = LiveModel(PROFILE, replace(CFG, max_deferred_steps=30))
    samples = steps(PROFILE, 400)
    asked = []
    for x in samples[:109]:  # due at the next usable step (the 100th); until then never asked
        assert live.observe(x, online_waits=lambda: asked.append(1) or True) is None
    assert asked == []
    busy = [live.observe(x, online_waits=lambda: True) for x in samples[109:129]]
    assert busy == [None] * 20  # put off while online requests wait...
    status = live.observe(samples[129], online_waits=lambda: False)
    assert status is not None and status.num_steps == 130  # ...to the first step with none
    busy = [live.observe(x, online_waits=lambda: True) for x in samples[130:300]]
    assert [s.num_steps for s in busy if s is not None] == [210, 290]  # ...or 30 steps late


def test_unusable_steps_are_never_fitted_on():
    live = LiveModel(PROFILE, CFG)
    assert feed(live, steps(PROFILE, 500), usable=False) == []
    assert live.refit is None


def test_a_slower_host_is_learned_and_plans():
    slower = LatencyModel(tuple(1.5 * c for c in PROFILE.coefficients))
    live = LiveModel(PROFILE, CFG)
    status = feed(live, steps(slower, 10 + 200, noise=0.02))[-1]
    assert status.adopted and live.model is status.refit
    assert status.refit_error.median_rel < 0.05 < status.profile_error.median_rel
    assert evaluate(live.model, steps(slower, 100, seed=7)).p90_rel < 0.08


def test_a_true_profile_keeps_planning():
    live = LiveModel(PROFILE, CFG)
    status = feed(live, steps(PROFILE, 10 + 200))[-1]
    assert not status.adopted and live.model is PROFILE
    assert status.profile_error.max_rel < 1e-9


def test_without_adopt_the_refit_is_reported_but_never_plans():
    slower = LatencyModel(tuple(2 * c for c in PROFILE.coefficients))
    live = LiveModel(PROFILE, RefitConfig(**{**CFG.to_dict(), "adopt": False}))
    status = feed(live, steps(slower, 10 + 200))[-1]
    assert not status.adopted and live.model is PROFILE
    assert status.refit_error.p90_rel < status.profile_error.p90_rel


def test_a_feature_the_live_steps_never_vary_keeps_the_profiles_value():
    logprob = FEATURES.index("logprob_tokens")
    slower = LatencyModel(tuple(0.0 if i == logprob else 1.3 * c for i, c in enumerate(PROFILE.coefficients)))
    live = LiveModel(PROFILE, CFG)
    feed(live, steps(slower, 10 + 200))  # no prompt-logprob chunk among them
    assert live.refit.coefficients[logprob] == pytest.approx(PROFILE.coefficients[logprob], rel=0.05)


def test_steps_slowed_by_other_processes_do_not_drag_the_fit():
    samples = steps(PROFILE, 300, seed=3, noise=0.02, slow_share=0.1)
    robust = fit(samples)
    clean = steps(PROFILE, 100, seed=4)
    assert evaluate(robust, clean).median_rel < 0.03
    assert np.allclose(robust.coefficients[:3], PROFILE.coefficients[:3], rtol=0.15)


def test_status_round_trips_through_json():
    live = LiveModel(PROFILE, CFG)
    status = feed(live, steps(PROFILE, 10 + 100, noise=0.05))[-1]
    assert RefitStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status
    assert RefitConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RefitConfig(window=50, min_samples=100)


def test_import_does_not_load_torch_or_vllm():
    code = ("import sys, conserve_bench.sched.refit; "
            "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_server_shows_and_stores_what_the_engine_wrote(tmp_path, store):
    """The engine-core process writes its refit to a file; the API server's watcher sets the
    /metrics gauges from it and stores it under the profile's key."""
    from prometheus_client import REGISTRY

    from conserve_bench.profiling.profiles import current_key, refit_for
    from conserve_bench.vllm_plugin.scheduler import write_refit_state
    from conserve_bench.serve.metrics import RefitWatcher

    key = current_key("smollm2-135m", "float32")
    path = tmp_path / "refit.json"
    watcher = RefitWatcher(str(path), store, key)
    assert watcher.poll() is None  # nothing written yet
    slower = LatencyModel(tuple(1.5 * c for c in PROFILE.coefficients))
    live = LiveModel(PROFILE, CFG)
    status = feed(live, steps(slower, 10 + 100))[-1]
    write_refit_state(str(path), status, refit_s=0.001)
    assert watcher.poll() == status and watcher.poll() is None  # each refit once

    def gauge(model, quantile):
        return REGISTRY.get_sample_value("conserve_latency_model_rel_error",
                                         {"model": model, "quantile": quantile})
    assert gauge("profile", "0.9") == pytest.approx(status.profile_error.p90_rel)
    assert gauge("refit", "0.5") == pytest.approx(status.refit_error.median_rel)
    assert REGISTRY.get_sample_value("conserve_latency_model_refit_adopted") == 1
    assert status.corrections and all(
        REGISTRY.get_sample_value("conserve_latency_model_size_correction", {"size_class": name})
        == pytest.approx(value) for name, value in status.corrections.items())
    assert refit_for(store, key)[0] == status


def test_the_next_server_starts_from_the_refit_and_margins_the_last_one_stored(tmp_path):
    """The engine writes each refit with its tail margins; the server stores it under the
    profile's key; the next `conserve` server on that store starts from both (not under
    `--no-warm-start`, another policy, or before any refit); a benchmark's fresh stores get
    them through `ProfileCache`."""
    from conserve_bench.bench.phases import ProfileCache
    from conserve_bench.profiling.profiles import Profile, current_key, refit_for, save_profile
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import WarmStart
    from conserve_bench.serve.metrics import RefitWatcher
    from conserve_bench.serve.server import ServeConfig, warm_start
    from conserve_bench.store import Store
    from conserve_bench.vllm_plugin.scheduler import write_refit_state

    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(db_url)
    profile = Profile(current_key("smollm2-135m", "float32"), PROFILE, num_samples=1)
    save_profile(store, profile)
    cfg = ServeConfig(db_url=db_url, policy="conserve")
    assert warm_start(cfg, profile) is None  # no server has refitted yet
    live = LiveModel(PROFILE, CFG)
    status = feed(live, steps(LatencyModel(tuple(1.5 * c for c in PROFILE.coefficients)), 110))[-1]
    margins = TailFactors(online=1.05, mixed=1.5, offline=1.2)
    write_refit_state(str(tmp_path / "refit.json"), replace(status, tail=margins), refit_s=0.001)
    RefitWatcher(str(tmp_path / "refit.json"), store, profile.key).poll()
    assert status.adopted and status.corrections  # the steps' classes, measured against the refit
    assert warm_start(cfg, profile) == WarmStart(status.refit, margins, status.corrections)
    assert warm_start(replace(cfg, warm_start=False), profile) is None
    assert warm_start(replace(cfg, policy="online-only"), profile) is None

    cache = ProfileCache(f"sqlite:///{tmp_path / 'cache.db'}", "smollm2-135m")
    save_profile(cache.store, profile)
    cache.keep_refit(db_url)  # a phase's server stopped: its refit is kept
    fresh = f"sqlite:///{tmp_path / 'phase.db'}"
    cache.copy_to(fresh)  # the next phase's fresh store
    assert refit_for(Store(fresh), profile.key)[0] == replace(status, tail=margins)


def test_the_api_processs_loop_stalls_and_collector_pauses_are_in_the_metrics():
    """A stall of the server's event loop (here: 150 ms of work holding it) and a collection
    on another thread, as `/metrics` shows them."""
    import asyncio
    import gc
    import threading
    import time

    from prometheus_client import REGISTRY

    from conserve_bench.serve.metrics import ProcessWatch

    def count(name, le, labels=None):
        return REGISTRY.get_sample_value(f"{name}_bucket", {**(labels or {}), "le": le}) or 0.0

    def counts():
        return (REGISTRY.get_sample_value("conserve_api_loop_stall_seconds_count") or 0.0,
                count("conserve_api_loop_stall_seconds", "0.1"),
                REGISTRY.get_sample_value("conserve_api_gc_pause_seconds_count", {"generation": "2"}) or 0.0)

    watcher = ProcessWatch()

    async def stall_and_collect():
        watch = asyncio.create_task(watcher.run(every_s=0.01))
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # NOTE: the loop's thread busy, as the collector or a long Python call keeps it
        collector = threading.Thread(target=gc.collect)
        collector.start()
        collector.join()
        await asyncio.sleep(0.05)
        watch.cancel()

    before = counts()
    asyncio.run(stall_and_collect())
    after = counts()
    num_wakes, num_quick = after[0] - before[0], after[1] - before[1]
    assert num_wakes >= 5 and num_wakes - num_quick >= 1  # a wake over 100 ms late: the stall
    assert after[2] - before[2] >= 1  # the full collection, timed
    assert watcher._on_collect not in gc.callbacks  # the collector's hook goes with the task


# -- the tail margin: planning against a quantile of live step time --------------------------


def test_the_tail_margin_is_each_kinds_quantile_of_measured_over_predicted():
    from conserve_bench.sched.refit import TailMargin

    margin = TailMargin(0.9, window=100, min_samples=10, warmup_steps=0)
    for i in range(100):  # mixed steps: 1.00, 1.01, ... 1.99 x their prediction
        margin.observe("mixed", 0.050, 0.050 * (1 + i / 100))
    for _ in range(5):
        margin.observe("offline", 0.2, 0.5)  # too few to trust
    for _ in range(50):
        margin.observe("online", 0.040, 0.030)  # faster than predicted: never below 1
    factors = margin.factors()
    assert factors.mixed == pytest.approx(1.90)
    assert (factors.offline, factors.online) == (1.0, 1.0)
    for _ in range(100):
        margin.observe("mixed", 0.050, 0.050)  # the window keeps the newest 100
    assert margin.factors().mixed == 1.0
    default = TailMargin(0.9, warmup_steps=0)  # a kind counts from its 8th step, at its slowest of 8
    for i in range(8):
        assert default.factors().mixed == 1.0
        default.observe("mixed", 0.030, 0.030 * (1.2 + i / 100))
    assert default.factors().mixed == pytest.approx(1.27)


def test_a_margin_ages_out_with_the_servers_steps_and_so_does_its_prior():
    """A high factor stops its kind's steps, and with them its own measurement: it must age
    out, or the kind is never planned again (a mixed margin of 2.31 carried by warm starts
    left no offline token beside online decodes in three rounds of `bench`)."""
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import TailMargin

    margin = TailMargin(0.9, prior=TailFactors(offline=1.5), warmup_steps=0, max_age=100)
    for _ in range(8):
        margin.observe("mixed", 0.030, 0.060)
    assert (margin.factors().mixed, margin.factors().offline) == (2.0, 1.5)
    for _ in range(92):  # the mixed steps are among the server's last 100
        margin.observe("online", 0.030, 0.030)
    assert (margin.factors().mixed, margin.factors().offline) == (2.0, 1.5)
    margin.observe("online", 0.030, 0.030)  # the first mixed step is not: 7 are too few
    assert (margin.factors().mixed, margin.factors().offline) == (1.0, 1.0)
    for _ in range(8):
        margin.observe("mixed", 0.030, 0.036)  # measured anew
    assert margin.factors().mixed == pytest.approx(1.2)


def test_the_engines_first_steps_never_count_toward_a_margin():
    """A server's first step ran 2.2-4.4x its prediction in every run logged: among a kind's
    first 8 steps it alone would set the factor."""
    from conserve_bench.sched.refit import TailMargin

    margin = TailMargin(0.9, warmup_steps=16)
    margin.observe("offline", 0.5, 1.5)  # the engine's first step
    for _ in range(15):
        margin.observe("online", 0.03, 0.03)
    for _ in range(8):
        margin.observe("offline", 0.5, 0.55)
    assert margin.factors().offline == pytest.approx(1.1)
    assert TailMargin(0.9).warmup_steps == RefitConfig().warmup_steps


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["online", "mixed", "offline", "idle"]),
                          st.floats(0.5, 3.0)), min_size=40, max_size=120))
def test_a_margin_is_its_kinds_quantile_over_the_ratios_still_counted(steps):
    """Kept sorted as steps come and age out (the scheduler reads the factors every step):
    each kind's factor is the quantile of exactly the ratios its window still holds."""
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import TailMargin

    prior = TailFactors(online=1.2, mixed=1.7, offline=1.3)
    margin = TailMargin(0.9, window=12, min_samples=3, prior=prior, warmup_steps=2, max_age=30)
    counted: dict[str, list[tuple[int, float]]] = {k: [] for k in TailMargin.KINDS}
    for number, (kind, ratio) in enumerate(steps, start=1):
        margin.observe(kind, 0.1, 0.1 * ratio)
        if number > 2 and kind in counted:
            counted[kind] = (counted[kind] + [(number, 0.1 * ratio / 0.1)])[-12:]
        for k in counted:
            counted[k] = [(n, r) for n, r in counted[k] if number - n < 30]
        got = margin.factors()
        for k, held in counted.items():
            ratios = sorted(r for _, r in held)
            expected = (max(1.0, ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))]) if len(ratios) >= 3
                        else getattr(prior, k) if number <= 30 else 1.0)
            assert getattr(got, k) == pytest.approx(expected), (k, number)


def test_plans_are_sized_so_the_tail_not_the_mean_meets_the_budget():
    from conserve_bench.sched.policy import Pending, TailFactors, Targets, plan_step

    model = LatencyModel((0.0389, 0.00203, 0.00213, 4.5e-6, 0.82e-6, 0.00067, 0.005))
    online = [Pending("on", 1, 300, decode=True)]
    offline = [Pending("off", 2000, 0, running=True)]
    slo = Targets(ttft_s=2.0, tbt_s=0.2)
    mean = plan_step(online, offline, model, slo, 4096)
    tail = plan_step(online, offline, model, slo, 4096, tail=TailFactors(mixed=1.3))
    assert tail.budget_s == pytest.approx(mean.budget_s / 1.3)
    assert 1.3 * tail.predicted_s <= mean.budget_s < 1.3 * mean.predicted_s  # the tail now fits
    bounded = Targets(ttft_s=2.0, tbt_s=0.2, max_slowdown=0.2)
    # bounded: online work alone has a tail too; only the mixed steps' excess over it counts
    same = plan_step(online, offline, model, bounded, 4096, tail=TailFactors(online=1.3, mixed=1.3))
    assert same.budget_s == pytest.approx(plan_step(online, offline, model, bounded, 4096).budget_s)
    worse = plan_step(online, offline, model, bounded, 4096, tail=TailFactors(online=1.1, mixed=1.43))
    assert worse.budget_s == pytest.approx(same.budget_s / 1.3)
    # offline-only steps sized for throughput (layer preemption cuts them) are left alone
    preemptive = Targets(ttft_s=2.0, tbt_s=0.2, offline_step_s=0.3)
    assert plan_step([], offline, model, preemptive, 4096, tail=TailFactors(offline=2.0)).budget_s == 0.3


# -- a restarted server starts from what the last one learned ---------------------------------


def test_a_warm_start_plans_with_the_stored_refit_until_the_first_live_one():
    from conserve_bench.sched.refit import WarmStart

    slower = LatencyModel(tuple(c * 1.3 for c in PROFILE.coefficients))
    warm = WarmStart.from_dict(json.loads(json.dumps(WarmStart(slower).to_dict())))
    assert warm.model == slower
    live = LiveModel(PROFILE, CFG, start=warm.model)
    assert live.model == slower and live.refit is None
    # the first refit is judged against the profile alone: live steps as the profile
    # predicts them replace the warm model by a refit of them (or by the profile)
    statuses = feed(live, steps(PROFILE, 200, noise=0.02))
    assert statuses and live.model in (live.refit, PROFILE) and live.model != slower
    assert LiveModel(PROFILE, RefitConfig(**{**CFG.to_dict(), "adopt": False}), start=slower).model == PROFILE


def test_a_warm_start_takes_the_refit_only_if_it_was_adopted_and_keeps_the_margins():
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import WarmStart

    refit = LatencyModel(tuple(c * 1.2 for c in PROFILE.coefficients))
    margins = TailFactors(online=1.1, mixed=1.6, offline=1.2)
    status = RefitStatus(FitError(0.3, 0.4, 0.6, 50), FitError(0.05, 0.1, 0.2, 50), True, refit, 3, 400)
    kept = RefitStatus.from_dict(json.loads(json.dumps(replace(status, tail=margins).to_dict())))
    assert kept.tail == margins
    assert WarmStart.from_status(kept) == WarmStart(refit, margins)
    assert WarmStart.from_status(replace(kept, adopted=False)) == WarmStart(None, margins)
    older = {k: v for k, v in status.to_dict().items() if k != "tail"}  # stored before margins were
    assert RefitStatus.from_dict(older).tail is None
    assert WarmStart.from_status(RefitStatus.from_dict(older)).tail == TailFactors()


def test_a_tail_margin_starts_from_its_prior_until_a_kind_counts_its_own():
    from conserve_bench.sched.policy import TailFactors
    from conserve_bench.sched.refit import TailMargin

    margin = TailMargin(0.9, min_samples=8, prior=TailFactors(mixed=1.6, offline=1.2), warmup_steps=0)
    assert (margin.factors().mixed, margin.factors().offline, margin.factors().online) == (1.6, 1.2, 1.0)
    for _ in range(7):
        margin.observe("mixed", 0.030, 0.033)
    assert margin.factors().mixed == 1.6  # seven live steps: still the prior
    margin.observe("mixed", 0.030, 0.033)
    assert margin.factors().mixed == pytest.approx(1.1)  # its own from the 8th
    assert margin.factors().offline == 1.2
