"""ConserveScheduler's adapter layer, without an engine: the vLLM 0.32.0 names it relies on
(fails loudly when an upgrade moves one) and how it reads a scheduled step."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from conserve_bench.latency import ChunkShape
from conserve_bench.steplog import SCHEDULER_CLS, step_shape


def test_scheduler_cls_resolves_to_a_vllm_scheduler_subclass():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.scheduler import Scheduler

    from conserve_bench.scheduler import ConserveScheduler

    assert resolve_obj_by_qualname(SCHEDULER_CLS) is ConserveScheduler
    assert issubclass(ConserveScheduler, Scheduler)


def test_vllm_scheduler_names():
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert list(inspect.signature(Scheduler.schedule).parameters) == ["self", "throttle_prefills"]
    assert list(inspect.signature(Scheduler.update_from_output).parameters) == [
        "self", "scheduler_output", "model_runner_output"]
    assert callable(Scheduler.shutdown)
    assert "num_scheduled_tokens" in SchedulerOutput.__dataclass_fields__
    assert "additional_config" in VllmConfig.__dataclass_fields__
    request_init = inspect.getsource(Request.__init__)
    for name in ("self.num_prompt_tokens", "self.num_computed_tokens", "self.sampling_params"):
        assert name in request_init, f"Request {name} moved"


def test_vllm_advances_computed_tokens_at_the_end_of_schedule():
    """ConserveScheduler reads a request's context as num_computed_tokens minus this step's."""
    from vllm.v1.core.sched.scheduler import Scheduler

    schedule = inspect.getsource(Scheduler.schedule)
    assert schedule.rstrip().endswith("return scheduler_output")
    tail = schedule[schedule.rindex("self._update_after_schedule(scheduler_output)"):]
    assert tail.count("\n") <= 2, "something runs after _update_after_schedule in schedule()"
    assert "request.num_computed_tokens += num_scheduled_token" in inspect.getsource(
        Scheduler._update_after_schedule)


def test_engine_core_step_schedules_then_updates_from_output():
    from vllm.v1.engine.core import EngineCore

    for step in (EngineCore.step, EngineCore.step_with_batch_queue):
        source = inspect.getsource(step)
        assert 0 < source.index("self.scheduler.schedule(") < source.index(
            "self.scheduler.update_from_output(")


def test_vllm_cpu_runs_without_a_batch_queue():
    """On CPU a step is timed from schedule() to update_from_output() with nothing overlapped."""
    from vllm.platforms.cpu import CpuPlatform

    assert "scheduler_config.async_scheduling = False" in inspect.getsource(
        CpuPlatform.check_and_update_config)


def test_scheduled_requests_read_the_context_before_the_step():
    from conserve_bench.scheduler import ConserveScheduler

    def request(num_computed, num_prompt, prompt_logprobs=None):
        return SimpleNamespace(num_computed_tokens=num_computed, num_prompt_tokens=num_prompt,
                               sampling_params=SimpleNamespace(prompt_logprobs=prompt_logprobs))

    scheduler = object.__new__(ConserveScheduler)  # no engine: only `requests` is read
    # As vLLM leaves them after schedule(): computed tokens already include this step's.
    scheduler.requests = {"a": request(256, 256), "b": request(65, 64), "c": request(512, 1024, 1)}
    output = SimpleNamespace(num_scheduled_tokens={"a": 256, "b": 1, "c": 256})
    shape = step_shape(ConserveScheduler._scheduled_requests(scheduler, output))
    assert shape.prefills == (ChunkShape(256, 0), ChunkShape(256, 256, prompt_logprobs=True))
    assert shape.decode_context_lens == (64,)
