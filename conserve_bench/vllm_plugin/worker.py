"""PreemptibleWorker: vLLM's worker (`worker_cls`) that turns an abandoned step into an output.

When the connector's safepoint raises `StepAborted` mid forward pass, the worker answers the
step with a `ModelRunnerOutput` that has no tokens and carries the `AbortReport`;
`ConserveScheduler` rolls the step back before vLLM reads it. The base class is the platform's
own worker (CPU or CUDA), picked at import. It must never swallow any other exception.

vLLM names relied on: docs/vllm-contract.md#worker.
"""

from __future__ import annotations

from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from conserve_bench.vllm_plugin.safepoints import AbortReport, StepAborted


def _platform_worker() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def aborted_output(report: AbortReport) -> ModelRunnerOutput:
    """The answer to an abandoned step: no request produced anything."""
    return ModelRunnerOutput(req_ids=[], req_id_to_index={},
                             kv_connector_output=KVConnectorOutput(kv_connector_worker_meta=report))


class PreemptibleWorker(_platform_worker()):
    def execute_model(self, scheduler_output):
        try:
            return super().execute_model(scheduler_output)
        except StepAborted as aborted:
            return aborted_output(aborted.report)
