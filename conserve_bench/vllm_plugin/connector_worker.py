"""The connector's worker half: layer safepoints, and the host pool's copies.

`ConnectorWorker` runs in vLLM's worker process, called by `connector.ConserveConnector` from
the model runner's hooks: it counts attention layers for `safepoints.Safepoints` (which raise
`StepAborted` in an armed step while an admitted online request waits), and carries out the
copies the scheduler half put in the step's `StepMeta` with `kvpool.HostPool`: loads before
the forward pass, saves after a step that ran to the end, a flush before preempted blocks are
reused. It never decides what to copy or which step to cut. vLLM names relied on:
docs/vllm-contract.md#connector-worker-half.
"""

from __future__ import annotations

from conserve_bench.sched.policy import safepoint_every
from conserve_bench.vllm_plugin.arrivals import ArrivalSignal
from conserve_bench.vllm_plugin.overrides import ConnectorConfig
from conserve_bench.vllm_plugin.safepoints import AbortReport, RunAheadBound, RunOutReport, Safepoints, StepMeta


class ConnectorWorker:
    """The worker half of `ConserveConnector` (see the module docstring)."""

    def __init__(self, config: ConnectorConfig, num_layers: int, num_pool_slots: int):
        arrivals = ArrivalSignal(config.arrival_path) if config.arrival_path else None
        bound = _run_ahead_bound() if config.layer_preemption else None
        every = config.safepoint_every or safepoint_every(waits_for_device=bound is not None)
        self.safepoints = Safepoints(every, num_layers, arrivals, bound)
        self._num_pool_slots = num_pool_slots
        self.pool = None  # the host pool, once vLLM registers its KV caches

    @property
    def report(self) -> AbortReport | RunOutReport | None:
        """What the last step reports back: why it was abandoned, that an arrival let it run
        out, or None if it ran with none."""
        return self.safepoints.report or self.safepoints.run_out

    def begin_step(self, meta: StepMeta) -> None:
        self.safepoints.begin(meta)

    def after_layer(self) -> None:
        self.safepoints.after_layer()

    def end_step(self) -> None:
        # NOTE: vLLM calls this for an abandoned step too (from a `finally`): its KV is half
        # written, so it is never saved (the scheduler half drops its slots).
        meta = self.safepoints.meta
        if self.pool is not None and meta is not None and meta.saves and self.safepoints.report is None:
            self.pool.save(*zip(*meta.saves))
        self.safepoints.end()

    def register_kv_caches(self, kv_caches, num_blocks: int) -> None:
        if self._num_pool_slots:
            from conserve_bench.vllm_plugin.kvpool import HostPool

            self.pool = HostPool(kv_caches, self._num_pool_slots, num_blocks)

    def handle_preemptions(self, meta: StepMeta) -> None:
        if self.pool is not None and meta.flush:
            self.pool.flush()

    def start_load_kv(self) -> None:
        meta = self.safepoints.meta
        if self.pool is not None and meta is not None and meta.loads:
            self.pool.load(*zip(*meta.loads))


def _run_ahead_bound() -> RunAheadBound | None:
    """Events on CUDA; none on the CPU, where every layer has finished when its hook runs."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return None
    import torch

    return RunAheadBound((torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)))
