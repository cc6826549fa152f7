"""The in-process vLLM engine, driven item by item.

`Engine` owns one vLLM `LLMEngine` (V1) and keeps the engine contract (`contract.ItemEngine`):
`submit(items)` turns them into prompts (`prompts.py`, through `contract.PromptBook`) and
`step()` runs one engine step and returns the items that finished. Generations stream their
tokens (`RequestOutputKind.DELTA`), so the runner can save them (partials). It never touches the
store; the runner decides what to submit and when to commit.

vLLM names relied on: docs/vllm-contract.md#local-engine.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from conserve_bench.config import EngineConfig, ModelOptions
from conserve_bench.engine.contract import Partials, PromptBook
from conserve_bench.engine.models import ModelRef, weights_identity
from conserve_bench.engine.prompts import Prompt
from conserve_bench.errors import SettingError
from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY, step_log_path

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 1.0
# NOTE: `CONSERVE_BENCH_ENFORCE_EAGER=1` starts vLLM without torch.compile: about half the
# start-up on the CPU build (16 s vs 32 s in process on 2 cores), a slower evaluation (73 vs
# 54 s for `make demo`'s). For short runs (the test suite); an engine config that says either
# way wins.
EAGER_ENV = "CONSERVE_BENCH_ENFORCE_EAGER"
# NOTE: vLLM's CPU build keeps one CPU per worker out of the model's OpenMP threads for its
# scheduler process (`VLLM_CPU_NUM_OF_RESERVED_CPU`, 1 on x86), which mostly waits for the
# worker. On a small host that is a large share of the machine: on 2 cores, with none
# reserved, prefill ran 1.9x and decode 1.6x faster (README, "Measured"). Hosts of up to
# SMALL_HOST_CPUS CPUs reserve none; larger ones keep vLLM's default; the variable, when set, wins.
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
SMALL_HOST_CPUS = 4
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"
# NOTE: vLLM keeps an engine's distributed state (its model-parallel groups) per process: with
# two engine cores in one process, closing either breaks the other ("pipeline model parallel
# group is not initialized"). While one runs here, another engine gets vLLM's engine-core process.
_engines_in_process = 0


def reserved_cpus() -> int | None:
    """The CPUs vLLM's CPU build keeps from the model on this host, or None for vLLM's default."""
    if RESERVED_CPU_ENV in os.environ:
        value = os.environ[RESERVED_CPU_ENV]
        if not value.strip().isdigit():
            raise SettingError(f"{RESERVED_CPU_ENV} must be a whole number of CPUs, got {value!r}")
        return int(value)
    return 0 if len(os.sched_getaffinity(0)) <= SMALL_HOST_CPUS else None


def engine_environment(cfg: EngineConfig) -> None:
    """Environment vLLM's CPU build reads at start-up; set before vLLM is imported."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.kv_cache_gib))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # NOTE: vllm-cpu 0.32.0 fails to load its own AOT-compiled artifacts ("'function' object
    # has no attribute 'finalize_loading'") and recompiles at every start (~80 s on 2 cores);
    # the regular torch.compile cache loads fine (~45 s).
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    reserved = reserved_cpus()
    if reserved is not None:
        os.environ.setdefault(RESERVED_CPU_ENV, str(reserved))
    if cfg.batch_invariant:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    if cfg.kv_transfer_config:
        # NOTE: our worker subclass catches abandoned steps in vLLM's V1 model runner; CUDA
        # vLLM would otherwise pick its V2 runner (the connector refuses to start under it).
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def is_cpu_build() -> bool:
    """Whether vLLM will run on its CPU platform, decided as vLLM decides it
    (`vllm.platforms.cpu_platform_plugin`: `VLLM_TARGET_DEVICE=cpu`, the `vllm-cpu` build, or
    macOS) without importing vLLM.

    NOTE: importing vLLM sets up its logging from the environment `engine_environment` has
    not set yet; the engine's dtype is chosen before that (`engine_config`).
    """
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu" or sys.platform.startswith("darwin"):
        return True
    try:
        return "cpu" in version("vllm")
    except PackageNotFoundError:
        try:
            version("vllm-cpu")
            return True
        except PackageNotFoundError:
            return False


def engine_config(model: ModelRef, options: ModelOptions | None = None, **overrides: Any) -> EngineConfig:
    """The `EngineConfig` of `model` loaded as `options` say (`auto` dtype resolved for this
    platform), with other `EngineConfig` fields `overrides`: the one builder `submit`,
    `serve`, `profile` and the lm-eval session share."""
    return EngineConfig.for_model(model.path, model.name, options or ModelOptions(),
                                  on_cpu=is_cpu_build(), **overrides)


def vllm_runtime() -> str:
    """vLLM's version and the device it computes on (`0.32.0+cpu`): vLLM's CPU and CUDA
    builds give other numerics for the same model."""
    import vllm
    from vllm.platforms import current_platform

    version, device = vllm.__version__, current_platform.device_type
    return version if version.endswith(f"+{device}") else f"{version}+{device}"


def engine_fingerprint(cfg: EngineConfig, max_model_len: int, model_config=None) -> str:
    """The fingerprint of an engine of `cfg` running at `max_model_len` (`model_config`:
    its vLLM `ModelConfig` once started, whose dtype it names): `EngineConfig.fingerprint`
    with the weights' identity and vLLM's runtime.

    NOTE: `Engine` (`submit`) and `serve` both take it from here, so they agree.
    """
    dtype = str(model_config.dtype).removeprefix("torch.") if model_config is not None else None
    return cfg.fingerprint(max_model_len, weights_identity(cfg.model_path, cfg.revision),
                           vllm_runtime(), dtype)


def engine_args(cfg: EngineConfig) -> dict[str, Any]:
    """vLLM engine arguments: the one place `submit`, `serve` and `profile` get them from."""
    args: dict[str, Any] = dict(
        # NOTE: -1 is vLLM's auto-fit: the model's own maximum, reduced only if the KV cache
        # cannot hold one sequence that long (read the result back with `context_length`).
        model=cfg.model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len or -1, seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_logprobs=20,
    )
    enforce_eager = cfg.enforce_eager
    if enforce_eager is None and os.environ.get(EAGER_ENV) == "1":
        enforce_eager = True
    if enforce_eager is not None:
        args["enforce_eager"] = enforce_eager
    if cfg.scheduler_cls:
        args["scheduler_cls"] = cfg.scheduler_cls
    if cfg.additional_config:
        args["additional_config"] = dict(cfg.additional_config)
    for name in ("worker_cls", "kv_transfer_config", "async_scheduling", "enable_prefix_caching",
                 "scheduling_policy"):
        if getattr(cfg, name) is not None:
            args[name] = getattr(cfg, name)
    if cfg.num_gpu_blocks is not None:
        args["num_gpu_blocks_override"] = cfg.num_gpu_blocks
    args |= model_loading_args(cfg)
    backend = executor_backend()
    if backend is not None:
        args["distributed_executor_backend"] = backend
    return args


def model_loading_args(cfg: EngineConfig) -> dict[str, Any]:
    """The model options vLLM takes as they are, where they differ from vLLM's defaults."""
    args: dict[str, Any] = {}
    if cfg.revision is not None:
        args["revision"] = cfg.revision
    if cfg.trust_remote_code:
        args["trust_remote_code"] = True
    if cfg.tensor_parallel_size != 1:
        args["tensor_parallel_size"] = cfg.tensor_parallel_size
    if cfg.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return args


def executor_backend() -> str | None:
    """vLLM's executor on this platform: on the CPU build, the worker in the engine core's
    process, as vLLM runs one GPU; None elsewhere (vLLM's default).

    NOTE: vLLM's CPU build turns `"uni"` into `"mp"` when the engine core has a process of
    its own: a third process (engine front, engine core, worker), one more vLLM import, about
    11 s of a 2-core host's start-up, for an overlap the CPU build does not do (no async
    scheduling). It does so because OpenMP needs the `LD_PRELOAD` it sets before the worker's
    process starts; the engine core's process is started after it too, so the worker can run
    there. The same executor named by its import path passes vLLM's check unchanged.
    """
    from vllm.platforms import current_platform

    return UNIPROC_EXECUTOR if current_platform.is_cpu() else None


def sampling_params(prompt: Prompt):
    """vLLM's `SamplingParams` for a prompt: a generation streams its new tokens as they come
    (to be saved as partials); a scored prompt reports once, when it is done."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if prompt.generates else RequestOutputKind.FINAL_ONLY
    return SamplingParams(**prompt.params, output_kind=kind)


def context_length(model_config) -> int:
    """The context length a started engine runs with, from its `ModelConfig`; says once, in
    one line, when the KV cache capped it below the model's own maximum."""
    effective = model_config.max_model_len
    model_max = model_config.get_and_verify_max_len(-1)
    if effective < model_max:
        log.warning("context length capped at %d tokens by the KV cache (the model supports %d); "
                    "give it more memory (VLLM_CPU_KVCACHE_SPACE, or gpu_memory_utilization) "
                    "to score longer contexts whole", effective, model_max)
    return effective


@contextlib.contextmanager
def engine_core_placement(cfg: EngineConfig) -> Iterator[bool]:
    """Start vLLM's engine core in this process on the CPU build (yields whether it does).

    NOTE: by default vLLM starts a process for its engine core (with the worker in it, see
    `executor_backend`), which imports vLLM and torch again: about 11 s of a 2-core host's
    start-up, for an overlap of scheduling and compute the CPU build does not do (it turns
    async scheduling off). On CUDA that overlap matters: vLLM's default stays. Engines with our
    worker subclass or KV connector keep it too: their tests run them in the layout `serve`
    does, which is vLLM's with its own process. One engine core at a time runs in this
    process (`_engines_in_process`). The variable is read only while the engine is built; vLLM
    then caches its environment for good, which this undoes so that later engines of this
    process read their own. `cfg.engine_core_in_process` decides when set (the profiler
    measures the layout `serve` runs).
    """
    from vllm import envs
    from vllm.platforms import current_platform

    in_process = cfg.engine_core_in_process
    if in_process is None:
        in_process = (current_platform.is_cpu() and not cfg.worker_cls and not cfg.kv_transfer_config
                      and MULTIPROCESSING_ENV not in os.environ and _engines_in_process == 0)
    previous = os.environ.get(MULTIPROCESSING_ENV)
    if in_process:
        os.environ[MULTIPROCESSING_ENV] = "0"
    try:
        yield in_process
    finally:
        if in_process:
            if previous is None:
                del os.environ[MULTIPROCESSING_ENV]
            else:
                os.environ[MULTIPROCESSING_ENV] = previous
            envs.disable_envs_cache()


def start_engine(model: ModelRef, options: ModelOptions | None = None, **overrides: Any) -> Engine:
    """An `Engine` of `model` loaded as `options` say, with `EngineConfig` fields
    `overrides` (e.g. the wing's, `vllm_plugin.overrides.engine_overrides`). Example:

        with start_engine(resolve_model("smollm2-135m"), **engine_overrides(step_log="s.jsonl")) as engine: ...
    """
    return Engine(engine_config(model, options, **overrides))


class Engine:
    """One vLLM engine serving offline work items."""

    def __init__(self, cfg: EngineConfig):
        engine_environment(cfg)
        from vllm import LLM

        self.cfg = cfg
        global _engines_in_process
        with engine_core_placement(cfg) as self._in_process:
            self.llm = LLM(**engine_args(cfg))
        _engines_in_process += self._in_process
        self._engine = self.llm.llm_engine
        self.max_model_len = context_length(self._engine.model_config)
        self.fingerprint = engine_fingerprint(cfg, self.max_model_len, self._engine.model_config)
        self._book = PromptBook(self._engine.get_tokenizer(), self.max_model_len, "item",
                                add_bos_token=cfg.add_bos_token)
        self._raw_ids = itertools.count()
        self._refused: list[tuple[str, Any]] = []  # (key, ItemError) not yet returned by step()

    @property
    def encoder(self):
        """lm-eval's tokenization rules at this engine's context length."""
        return self._book.encoder

    def submit(self, work: list, partials: Partials | None = None) -> None:
        from vllm.exceptions import VLLMClientError

        for request_id, prompt in self._book.add(work, partials):
            try:
                self._engine.add_request(request_id, {"prompt_token_ids": prompt.token_ids},
                                         sampling_params(prompt), priority=OFFLINE_PRIORITY)
            except (ValueError, TypeError, VLLMClientError) as e:  # this request alone is refused
                self._refused += self._book.fail(request_id, e)

    def step(self) -> list[tuple[str, Any]]:
        """Run one engine step; return (item key, result) for every item that finished."""
        finished, self._refused = self._book.take_ready() + self._refused, []
        # NOTE: vLLM's step() blocks on the engine core's output queue; with nothing in
        # flight (only items their partials completed) it would wait forever.
        if not self._engine.has_unfinished_requests():
            return finished
        for output in self._engine.step():
            request_id = output.request_id
            stop = self._book.extend(request_id, new_tokens(output), output.finished)
            if stop and not output.finished:
                self._engine.abort_request([request_id])
            # NOTE: an aborted request may still report its end; it is gone from the book.
            if output.finished or stop:
                finished += self._book.finish(request_id, output) or []
        return finished

    def partials(self) -> dict[str, list[int]]:
        return self._book.partials()

    @property
    def num_pending_items(self) -> int:
        return self._book.num_pending_items + len(self._refused)

    @property
    def num_generated_tokens(self) -> int:
        return self._book.num_generated_tokens

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished_requests()

    def close(self) -> None:
        """Stop vLLM's engine core: its processes (the interpreter would wait on them at exit),
        or, run in this process, let its model and KV cache go."""
        # NOTE: vLLM gives its engine-core process up to 5 s to exit on SIGTERM; nothing of
        # ours lives there (results are committed), so 1 s is enough.
        engine, self._engine = self._engine, None
        if engine is None:
            return
        engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        if self._in_process:
            global _engines_in_process
            _engines_in_process -= 1
            # NOTE: an engine core started here froze the GC heap (vLLM's `freeze_gc_heap`, for
            # a server that lives as long as its process): thawed, its model and KV cache go,
            # and torch.compile's caches of its graphs. Checked: no model object survives; the
            # allocator keeps about 0.7 GiB of the process's memory per engine closed.
            self.llm = engine = None
            gc.unfreeze()
            import torch

            torch.compiler.reset()
            gc.collect()

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
        request_ids = [f"raw-{next(self._raw_ids)}" for _ in prompts]
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
        return len(self._book.encoder.tokenizer)

    def run_until_idle(self) -> int:
        """Step until no request is left; returns the number of steps taken."""
        num_steps = 0
        while self._engine.has_unfinished_requests():
            self._engine.step()
            num_steps += 1
        return num_steps

    def abort_all(self) -> None:
        self._refused.clear()
        if request_ids := self._book.clear():
            self._engine.abort_request(request_ids)


def new_tokens(output) -> list[int]:
    """The tokens a streamed (DELTA) output brings; none for an output without completions."""
    return list(output.outputs[0].token_ids) if output.outputs else []
