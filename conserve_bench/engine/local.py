"""The in-process vLLM engine, driven item by item.

`Engine` owns one vLLM `LLMEngine` (V1) and speaks work items: `submit(items)` turns them into
prompts (see `requests.py`) and `step()` runs one engine step and returns the items that
finished. It never touches the store; the runner decides what to submit and when to commit.

vLLM 0.32.0 names relied on (tests/test_vllm_contract.py fails loudly if they move):
`vllm.LLM`, `LLM.llm_engine` (`add_request`, `step`, `abort_request`,
`has_unfinished_requests`, `get_tokenizer`, `engine_core.shutdown`), `vllm.SamplingParams` with
`logprob_token_ids`, `prompt_logprobs`, `priority` on `add_request`, `RequestOutput`
(`finished`, `request_id`, `prompt_token_ids`, `prompt_logprobs`, `outputs[0].token_ids`,
`.logprobs`, `.text`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

from conserve_bench.config import EngineConfig
from conserve_bench.engine.prompts import Assembler, Encoder, Prompt, build_prompts
from conserve_bench.sched.steplog import step_log_path

log = logging.getLogger(__name__)

OFFLINE_PRIORITY = 1  # online requests run at priority 0; lower runs first


def engine_environment(cfg: EngineConfig) -> None:
    """Environment vLLM's CPU build reads at start-up; set before vLLM is imported."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.kv_cache_gib))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # NOTE: vllm-cpu 0.32.0 fails to load its own AOT-compiled artifacts ("'function' object
    # has no attribute 'finalize_loading'") and recompiles at every start (~80 s on 2 cores);
    # the regular torch.compile cache loads fine (~45 s).
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if cfg.kv_transfer_config:
        # NOTE: our worker subclass catches abandoned steps in vLLM's V1 model runner; CUDA
        # vLLM would otherwise pick its V2 runner (the connector refuses to start under it).
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def engine_args(cfg: EngineConfig) -> dict[str, Any]:
    """vLLM engine arguments: the one place `submit`, `serve` and `profile` get them from."""
    args: dict[str, Any] = dict(
        model=cfg.model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_logprobs=20,
    )
    if cfg.scheduler_cls:
        args["scheduler_cls"] = cfg.scheduler_cls
    if cfg.additional_config:
        args["additional_config"] = dict(cfg.additional_config)
    for name in ("worker_cls", "kv_transfer_config", "async_scheduling"):
        if getattr(cfg, name) is not None:
            args[name] = getattr(cfg, name)
    return args


class Engine:
    """One vLLM engine serving offline work items."""

    def __init__(self, cfg: EngineConfig):
        engine_environment(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(**engine_args(cfg))
        self._engine = self.llm.llm_engine
        tokenizer = self._engine.get_tokenizer()
        # NOTE: one token of the context window is left for the token vLLM always generates.
        self.encoder = Encoder(tokenizer, cfg.max_model_len - 1)
        self._assembler = Assembler()
        self._prompts: dict[str, Prompt] = {}
        self._ids = itertools.count()

    @property
    def fingerprint(self) -> str:
        return self.cfg.fingerprint

    def submit(self, work: list, priority: int = OFFLINE_PRIORITY) -> None:
        from vllm import SamplingParams

        prompts, num_parts = build_prompts(work, self.encoder)
        self._assembler.expect(work, num_parts)
        for prompt in prompts:
            request_id = f"item-{next(self._ids)}"
            self._prompts[request_id] = prompt
            self._engine.add_request(
                request_id, {"prompt_token_ids": prompt.token_ids},
                SamplingParams(**prompt.params), priority=priority,
            )

    def step(self) -> list[tuple[str, Any]]:
        """Run one engine step; return (item key, result) for every item that finished."""
        finished: list[tuple[str, Any]] = []
        for output in self._engine.step():
            if output.finished:
                prompt = self._prompts.pop(output.request_id)
                finished += self._assembler.add(prompt, output)
        return finished

    @property
    def num_pending_items(self) -> int:
        return self._assembler.num_pending

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished_requests()

    def close(self) -> None:
        """Stop vLLM's engine-core processes (otherwise the interpreter waits on them at exit)."""
        self._engine.engine_core.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- raw token prompts (the profiler's batches); never mixed with work items -------------

    @property
    def step_log(self) -> str | None:
        """Where the scheduler logs each step, when started with one (see `steplog`)."""
        return step_log_path(self.cfg.additional_config)

    def submit_tokens(self, prompts: Sequence[Sequence[int]], priority: int = 0,
                      **sampling: Any) -> list[str]:
        """Submit token prompts with `SamplingParams(**sampling)` at `priority` (0: online,
        as the profiler's probes; OFFLINE_PRIORITY: offline); returns their request ids.

        Their outputs are not work items: drive them with `step_tokens` or `run_until_idle`.
        """
        from vllm import SamplingParams

        params = SamplingParams(**sampling)
        request_ids = [f"raw-{next(self._ids)}" for _ in prompts]
        for request_id, token_ids in zip(request_ids, prompts):
            self._engine.add_request(request_id, {"prompt_token_ids": list(token_ids)}, params,
                                     priority=priority)
        return request_ids

    def step_tokens(self) -> set[str]:
        """Run one engine step of raw prompts; returns the ids that produced a token."""
        # NOTE: vLLM's step() blocks on the engine core's output queue; with nothing in
        # flight it would wait forever.
        if not self._engine.has_unfinished_requests():
            return set()
        return {output.request_id for output in self._engine.step()}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder.tokenizer)

    def run_until_idle(self) -> int:
        """Step until no request is left; returns the number of steps taken."""
        num_steps = 0
        while self._engine.has_unfinished_requests():
            self._engine.step()
            num_steps += 1
        return num_steps

    def abort_all(self) -> None:
        if self._prompts:
            self._engine.abort_request(list(self._prompts))
        self._prompts.clear()
        self._assembler = Assembler()
