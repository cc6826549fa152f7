"""How conserve-bench plugs into vLLM: the conventions both sides of the engine must share.

Owns the request priorities (online 0, offline 1), the plug-in paths handed to vLLM
(`scheduler_cls`, `worker_cls`, `kv_connector_module_path`), and the layout of vLLM's plug-in config `additional_config["conserve"]`
("policy": a `policy.PolicyConfig` dict; "step_log": a path; "refit": a `refit.RefitConfig`
dict; "refit_state": the file the live refit is reported in). Read in the engine process by
`sched.scheduler`, written by `serve`, `profile` and the tests. And the JSON state files the
engine core writes for the server to read (`write_state`, `read_state`). Plain data: it
must never import torch or vLLM, so the pure policy side (`sched.steplog`) can import it.
"""

from __future__ import annotations

import json
import os
from typing import Any

# NOTE: vLLM's priority scheduling runs lower values first; online routes are forced to
# ONLINE_PRIORITY (serve's middleware), offline work items run at OFFLINE_PRIORITY.
ONLINE_PRIORITY = 0
OFFLINE_PRIORITY = 1
SCHEDULER_CLS = "conserve_bench.sched.scheduler.ConserveScheduler"
# Layer-wise preemption: the KV connector vLLM loads by module path, and the worker that
# catches a step the connector abandons.
CONNECTOR_MODULE = "conserve_bench.engine.connector"
WORKER_CLS = "conserve_bench.engine.worker.PreemptibleWorker"
CONFIG_KEY = "conserve"  # additional_config[CONFIG_KEY]: {"policy": ..., "step_log": ...}
POLICY, STEP_LOG, REFIT, REFIT_STATE = "policy", "step_log", "refit", "refit_state"
ENTRIES = (POLICY, STEP_LOG, REFIT, REFIT_STATE)


def is_online(priority: int) -> bool:
    return priority <= ONLINE_PRIORITY


def wants_prompt_logprobs(request) -> bool:
    """Whether a vLLM `Request` asks for prompt logprobs (such requests never read cached KV)."""
    params = request.sampling_params
    return params is not None and params.prompt_logprobs is not None


def conserve_config(additional_config: Any) -> dict[str, Any]:
    """`additional_config["conserve"]`, or {} (vLLM hands the engine whatever it was given)."""
    if not isinstance(additional_config, dict):
        return {}
    return additional_config.get(CONFIG_KEY) or {}


def step_log_path(additional_config: Any) -> str | None:
    """`additional_config["conserve"]["step_log"]`, or None."""
    return conserve_config(additional_config).get(STEP_LOG) or None


def conserve_overrides(additional_config: dict[str, Any] | None = None,
                       **entries: Any) -> dict[str, Any]:
    """`EngineConfig` fields that start vLLM with `ConserveScheduler`, with `entries` (any of
    ENTRIES) added to the plug-in config of `additional_config`."""
    unknown = set(entries) - set(ENTRIES)
    if unknown:
        raise ValueError(f"unknown {CONFIG_KEY} config entries: {', '.join(sorted(unknown))}")
    additional = dict(additional_config or {})
    additional[CONFIG_KEY] = {**conserve_config(additional), **entries}
    return {"scheduler_cls": SCHEDULER_CLS, "additional_config": additional}


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
