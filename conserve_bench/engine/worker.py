"""PreemptibleWorker: vLLM's worker (`worker_cls`) that turns an abandoned step into an output.

When the connector's safepoint raises `StepAborted` mid forward pass, the worker answers the
step with a `ModelRunnerOutput` that has no tokens and carries the `AbortReport`;
`ConserveScheduler` rolls the step back before vLLM reads it. The base class is the platform's
own worker (CPU or CUDA), picked at import. It must never swallow any other exception.

vLLM 0.32.0 names relied on (tests/test_preemption_contract.py): `vllm.platforms.
current_platform.is_cpu`, `vllm.v1.worker.cpu_worker.CPUWorker`, `vllm.v1.worker.gpu_worker.
Worker` (`execute_model(scheduler_output)`, which runs the model runner's `execute_model`
and leaves the connector's metadata cleared when it raises), `ModelRunnerOutput(req_ids,
req_id_to_index, kv_connector_output)`, `KVConnectorOutput(kv_connector_worker_meta)`, and
`EngineCore.step` not calling `sample_tokens` when `execute_model` returned an output.
"""

from __future__ import annotations

from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from conserve_bench.engine.safepoints import AbortReport, StepAborted


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
