"""Against the real engine: results agree with lm-eval's own `hf` backend on the same model.

Per request loglikelihoods within 0.05 nats, identical accuracy, greedy generations identical
on at least 95% of prompts. Uses the session engine (see conftest) and the local MMLU CSVs
through the `mmlu_local_*` task YAML.
"""

from __future__ import annotations

import os

import pytest

from conserve_bench.config import JobSpec, RunConfig
from conserve_bench.jobs.lifecycle import run_job, submit_job, task_metrics
from conserve_bench.harness.lm import ConserveLM
from conserve_bench.jobs.runner import Runner
from conserve_bench.jobs.taskspec import task_manager

from .conftest import TEST_TASKS

pytestmark = pytest.mark.engine

# NOTE: the task YAML over the local CSVs (tasks/mmlu_local); tests/test_harness.py checks it
# builds exactly the requests of lm-eval's own `mmlu_*`.
MMLU_TASKS = ["mmlu_local_abstract_algebra", "mmlu_local_high_school_geography"]
NATS = 0.05


@pytest.fixture(scope="module")
def hf_lm(model_ref):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model_ref.path, dtype="float32", device="cpu", batch_size=4)


def build_instances(tasks, data_dir=None, limit=None, num_fewshot=None):
    instances = []
    for task in task_manager(data_dir).load(tasks)["tasks"].values():
        if num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances += task.instances
    return instances


def conserve_lm(store, engine):
    job = store.create_job(JobSpec(tasks=("direct",)))
    return ConserveLM.for_job(store, Runner(store, engine, RunConfig(max_inflight=32)), job.id,
                              engine.fingerprint)


def test_mmlu_loglikelihoods_match_hf(store, engine, hf_lm, data_dir):
    instances = build_instances(MMLU_TASKS, data_dir, limit=6, num_fewshot=2)
    ours = conserve_lm(store, engine).loglikelihood(instances)
    theirs = hf_lm.loglikelihood(instances)
    assert len(ours) == len(theirs) == len(instances) == 2 * 6 * 4
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    assert worst < NATS, f"max |delta logprob| = {worst:.4f} nats"
    assert [a[1] for a in ours] == [b[1] for b in theirs]  # is_greedy


# NOTE: the subjects with the longest 5-shot prompts (about 3,000 tokens, more than the 2048
# the engine once truncated to): scored whole, they must equal hf's, which scores them whole.
LONG_MMLU_TASKS = ["mmlu_local_high_school_european_history", "mmlu_local_high_school_us_history"]


def test_longest_mmlu_prompts_are_scored_whole_and_match_hf(store, engine, hf_lm, data_dir):
    instances = build_instances(LONG_MMLU_TASKS, data_dir, limit=1, num_fewshot=5)
    longest = max(len(engine.encoder.encode(i.args[0])) for i in instances)
    assert 2048 < longest <= engine.encoder.max_prompt_len  # long, and within the context
    ours = conserve_lm(store, engine).loglikelihood(instances)
    theirs = hf_lm.loglikelihood(instances)
    assert len(ours) == len(theirs) == 2 * 4
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    assert worst < NATS, f"max |delta logprob| = {worst:.4f} nats"
    assert [a[1] for a in ours] == [b[1] for b in theirs]  # is_greedy


def test_multi_token_and_empty_context_requests_match_hf(store, engine, hf_lm):
    from lm_eval.api.instance import Instance

    pairs = [("The capital of France is", " Paris, a large city"), ("", "Hello world"),
             ("Two plus two equals ", "four."), ("Answer:", " B"), ("Answer: ", "B")]
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours = conserve_lm(store, engine).loglikelihood(instances)
    theirs = hf_lm.loglikelihood(instances)
    for pair, a, b in zip(pairs, ours, theirs):
        assert abs(a[0] - b[0]) < NATS, (pair, a, b)
        assert a[1] == b[1], (pair, a, b)


def test_rolling_loglikelihood_matches_hf(store, engine, hf_lm):
    instances = build_instances([str(TEST_TASKS / "conserve_tiny_rolling.yaml")])
    ours = conserve_lm(store, engine).loglikelihood_rolling(instances)
    theirs = hf_lm.loglikelihood_rolling(instances)
    assert len(ours) == 4
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < NATS


def test_greedy_generations_match_hf(store, engine, hf_lm):
    instances = build_instances([str(TEST_TASKS / "conserve_tiny_gen.yaml")])
    ours = conserve_lm(store, engine).generate_until(instances)
    theirs = hf_lm.generate_until(instances)
    differing = [(i.args[0], a, b) for i, a, b in zip(instances, ours, theirs) if a != b]
    for prompt, a, b in differing:
        print(f"DIFFERS {prompt!r}: conserve={a!r} hf={b!r}")
    assert len(differing) <= 0.05 * len(instances)


def test_job_accuracy_matches_hf_and_reuses_items(store, engine, data_dir, hf_lm, tmp_path):
    from lm_eval import simple_evaluate

    spec = JobSpec(tasks=tuple(MMLU_TASKS), limit=6, data_dir=data_dir)
    job = submit_job(store, spec)
    results = run_job(store, job.id, engine, output_dir=tmp_path)
    hf = simple_evaluate(model=hf_lm, tasks=MMLU_TASKS, limit=6, task_manager=task_manager(data_dir),
                         log_samples=False)
    ours, theirs = task_metrics(results), task_metrics(hf)
    for task in MMLU_TASKS:
        assert ours[task]["acc,none"] == theirs[task]["acc,none"]
    assert (tmp_path / f"{job.id}.json").is_file()
    assert results["conserve"]["num_items_computed"] == 2 * 6 * 4

    again = submit_job(store, spec)  # the same job again: every item is reused
    rerun = run_job(store, again.id, engine, output_dir=None)
    assert rerun["conserve"]["num_items_computed"] == 0
    assert task_metrics(rerun) == ours


def test_on_the_cpu_build_the_engine_core_runs_in_this_process(engine):
    """No engine-core process of its own (the worker runs in it): it would import vLLM again
    at start-up (`engine.local.engine_core_placement`)."""
    from vllm.platforms import current_platform
    from vllm.v1.engine.core_client import InprocClient

    from conserve_bench.engine.local import engine_core_placement

    if not current_platform.is_cpu():
        pytest.skip("vLLM's own process layout stays on accelerators")
    assert engine._in_process and isinstance(engine._engine.engine_core, InprocClient)
    # one at a time: a second engine core here would break this one's distributed state
    with engine_core_placement(engine.cfg) as second_in_process:
        assert not second_in_process and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
