"""What vLLM is given to load the wing, and the conventions both sides of the engine share.

Owns the request priorities (online 0, offline 1), the plug-in paths (`scheduler_cls`,
`worker_cls`, `kv_connector_module_path`), the layout of `additional_config["conserve"]`
(`ENTRIES`), the connector's settings (`ConnectorConfig`), and `engine_overrides`, the one
builder of all of it (which turns the mechanisms that need one worker off under tensor
parallelism, saying so: `single_worker`); and the JSON state files the engine core writes for the server
(`write_state`, `read_state`). Plain data, read in vLLM's processes and written by `serve`,
`submit`, `profile` and the tests: it must never import torch or vLLM (the front end builds
these before vLLM's environment is set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conserve_bench.errors import ConserveError

if TYPE_CHECKING:
    from conserve_bench.sched.policy import PolicyConfig
    from conserve_bench.sched.refit import RefitConfig, WarmStart

log = logging.getLogger(__name__)

# NOTE: vLLM's priority scheduling runs lower values first; online routes are forced to
# ONLINE_PRIORITY (serve's guard), offline work items run at OFFLINE_PRIORITY.
ONLINE_PRIORITY = 0
OFFLINE_PRIORITY = 1
SCHEDULER_CLS = "conserve_bench.vllm_plugin.scheduler.ConserveScheduler"
# The KV connector vLLM loads by module path, and the worker that catches a step it abandons.
CONNECTOR_NAME = "ConserveConnector"
CONNECTOR_MODULE = "conserve_bench.vllm_plugin.connector"
WORKER_CLS = "conserve_bench.vllm_plugin.worker.PreemptibleWorker"
CONFIG_KEY = "conserve"  # additional_config[CONFIG_KEY] and kv_connector_extra_config[CONFIG_KEY]
# `SamplingParams.extra_args[ARRIVAL_KEY]`: the number `serve` gave an online request when it
# admitted it (`arrivals.ArrivalSignal`); the scheduler settles it once a step schedules it.
ARRIVAL_KEY = "conserve_arrival"
POLICY, STEP_LOG, REFIT, REFIT_STATE = "policy", "step_log", "refit", "refit_state"
WARM_START = "warm_start"
ENTRIES = (POLICY, STEP_LOG, REFIT, REFIT_STATE, WARM_START)


class LayerPreemptionError(ConserveError, ValueError):
    """A configuration layer-wise preemption cannot run under (one requirement per message)."""


@dataclass(frozen=True)
class ConnectorConfig:
    """`kv_connector_extra_config["conserve"]`: plain JSON, validated once in every process."""

    safepoint_every: int | None = None  # None: the device's (`policy.safepoint_every`)
    layer_preemption: bool = True  # arm offline-only steps (off: checkpoints alone)
    arrival_path: str | None = None  # ArrivalSignal file; None: no arrival ever aborts
    checkpoint_gib: float = 0.0  # the host pool for KV checkpoints; 0: no checkpoints
    checkpoint_state_path: str | None = None  # the pool's use, as JSON, for `/metrics`

    def __post_init__(self):
        if self.safepoint_every is not None and not (isinstance(self.safepoint_every, int)
                                                     and self.safepoint_every >= 1):
            raise LayerPreemptionError(f"--safepoint-every must be >= 1, got {self.safepoint_every!r}")
        if not (isinstance(self.checkpoint_gib, (int, float)) and self.checkpoint_gib >= 0):
            raise LayerPreemptionError(f"--kv-checkpoint-gib must be >= 0, got {self.checkpoint_gib!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectorConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LayerPreemptionError(f"unknown connector settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def single_worker(tensor_parallel_size: int) -> bool:
    """Whether the wing's mechanisms that need one worker (layer-wise preemption and KV
    checkpoints: the connector and its worker) may load; under tensor parallelism they may
    not, and a one-line warning says so.

    NOTE: the connector cuts a step at a layer safepoint and copies KV blocks in and out of one
    worker's cache; with several workers each would have to stop at the same layer and copy
    its shard, which it does not do. The scheduling policy runs in the scheduler: it stays.
    """
    if tensor_parallel_size <= 1:
        return True
    log.warning("conserve: layer-wise preemption and KV checkpoints need one worker: off under "
                "tensor_parallel_size=%d (the conserve scheduling policy stays)", tensor_parallel_size)
    return False


def engine_overrides(additional_config: dict[str, Any] | None = None, *,
                     policy: PolicyConfig | None = None, refit: RefitConfig | None = None,
                     refit_state: str | None = None, step_log: str | Path | None = None,
                     connector: ConnectorConfig | None = None, warm_start: WarmStart | None = None,
                     tensor_parallel_size: int = 1) -> dict[str, Any]:
    """The `EngineConfig` fields that load the wing into vLLM: `ConserveScheduler` (planning
    with `policy`, from `warm_start` when the last server left one, refitting live by `refit`
    into the file `refit_state`, logging each step to `step_log`; with none of them it
    schedules as vLLM does), and with a `connector`,
    `ConserveConnector` with the worker and the synchronous scheduling it needs (not under
    `tensor_parallel_size` > 1: `single_worker`). Entries are added to the plug-in config of
    `additional_config`; its other keys are kept. Example:

        EngineConfig(model_path=..., model_name=..., **engine_overrides(step_log="steps.jsonl"))
    """
    entries = {POLICY: policy.to_dict() if policy else None, REFIT: refit.to_dict() if refit else None,
               REFIT_STATE: refit_state, STEP_LOG: str(step_log) if step_log else None,
               WARM_START: warm_start.to_dict() if warm_start else None}
    additional = dict(additional_config or {})
    additional[CONFIG_KEY] = {**conserve_config(additional),
                              **{k: v for k, v in entries.items() if v is not None}}
    overrides: dict[str, Any] = {"scheduler_cls": SCHEDULER_CLS, "additional_config": additional}
    if connector is not None and single_worker(tensor_parallel_size):
        overrides |= {"kv_transfer_config": {
            "kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_connector_extra_config": {CONFIG_KEY: dataclasses.asdict(connector)}},
            "worker_cls": WORKER_CLS, "async_scheduling": False}
    return overrides


def is_online(priority: int) -> bool:
    return priority <= ONLINE_PRIORITY


def arrival_number(request) -> int | None:
    """The arrival number `serve` tagged an online vLLM `Request` with, or None (not admitted
    by `serve`'s guard: an in-process engine's, a test's)."""
    params = request.sampling_params
    number = (params.extra_args or {}).get(ARRIVAL_KEY) if params is not None else None
    return number if isinstance(number, int) else None


def wants_prompt_logprobs(request) -> bool:
    """Whether a vLLM `Request` asks for prompt logprobs (such requests never read cached KV)."""
    params = request.sampling_params
    return params is not None and params.prompt_logprobs is not None


def conserve_config(additional_config: Any) -> dict[str, Any]:
    """`additional_config["conserve"]`, or {} (vLLM hands the engine whatever it was given)."""
    if not isinstance(additional_config, dict):
        return {}
    return additional_config.get(CONFIG_KEY) or {}


def connector_config(kv_connector_extra_config: dict[str, Any] | None) -> ConnectorConfig:
    """The `ConnectorConfig` `engine_overrides` put in vLLM's `kv_connector_extra_config`."""
    return ConnectorConfig.from_dict((kv_connector_extra_config or {}).get(CONFIG_KEY, {}))


def step_log_path(additional_config: Any) -> str | None:
    """`additional_config["conserve"]["step_log"]`, or None."""
    return conserve_config(additional_config).get(STEP_LOG) or None


def write_state(path: str, state: dict[str, Any]) -> None:
    """Replace the JSON state file at `path` atomically (the server reads it at any time)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def read_state(path: str) -> dict[str, Any] | None:
    """A state file `write_state` wrote; None while there is none yet (or a partial file from
    a writer other than `write_state`: the next poll reads it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
