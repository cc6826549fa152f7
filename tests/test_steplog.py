"""The step log without vLLM: shape extraction, the line format, reading back, step timing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import pytest

from conserve_bench.sched.latency import ChunkShape, LatencyModel, Sample, StepShape
from conserve_bench.sched.policy import PolicyConfig, Targets
from conserve_bench.sched.steplog import (ScheduledRequest, from_line, read_step_log,
                                          read_step_log_with_notes, step_shape, to_line)
from conserve_bench.vllm_plugin.overrides import (SCHEDULER_CLS, conserve_config, engine_overrides,
                                                  step_log_path)
from conserve_bench.vllm_plugin.steplog import CollectorTime, StepLogWriter, StepRecorder


def test_prefill_chunks_and_decodes_are_told_apart_by_computed_tokens():
    shape = step_shape([
        ScheduledRequest(256, 0, 256),                          # a whole prompt
        ScheduledRequest(1, 300, 300),                          # first decode after its prompt
        ScheduledRequest(128, 512, 1024, prompt_logprobs=True),  # a later chunk of a long prompt
        ScheduledRequest(1, 1030, 1024),                        # a decode further on
    ])
    assert shape.prefills == (ChunkShape(256, 0), ChunkShape(128, 512, prompt_logprobs=True))
    assert shape.decode_context_lens == (300, 1030)
    assert (shape.num_prefill_tokens, shape.num_decodes, shape.num_logprob_tokens) == (384, 2, 128)


def test_a_resumed_request_prefills_its_prompt_again():
    shape = step_shape([ScheduledRequest(70, 0, 64)])  # preempted after 6 outputs, recomputed
    assert shape.prefills == (ChunkShape(70, 0),) and shape.decode_context_lens == ()


shapes = st.builds(
    StepShape,
    st.lists(st.builds(ChunkShape, st.integers(0, 4096), st.integers(0, 4096), st.booleans()),
             max_size=4).map(tuple),
    st.lists(st.integers(0, 8192), max_size=64).map(tuple))


@given(shapes, st.floats(1e-6, 100.0))
def test_lines_round_trip(shape, step_s):
    assert from_line(to_line(Sample(shape, step_s))) == Sample(shape, step_s)


def test_reader_continues_from_its_offset_and_skips_a_partial_line(tmp_path):
    path = tmp_path / "steps.jsonl"
    writer = StepLogWriter(path)
    first = Sample(StepShape((ChunkShape(16, 0),)), 0.05)
    writer.write(first)
    samples, offset = read_step_log(path)
    assert samples == [first]
    second = Sample(StepShape((), (10, 11)), 0.04)
    writer.write(second)
    with open(path, "a") as f:
        f.write('{"step_s": 0.1, "pref')  # a line still being written
    samples, offset = read_step_log(path, offset)
    assert samples == [second]
    assert read_step_log(path, offset) == ([], offset)
    assert read_step_log(tmp_path / "missing.jsonl") == ([], 0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(tmp_path):
    clock = FakeClock()
    return StepRecorder(StepLogWriter(tmp_path / "steps.jsonl"), clock), clock


def test_step_time_is_from_scheduled_to_executed(tmp_path):
    rec, clock = recorder(tmp_path)
    step = object()
    clock.now = 1.0
    rec.scheduled(step, [ScheduledRequest(8, 0, 8)])
    clock.now = 1.25
    sample = rec.executed(step)
    assert sample == Sample(StepShape((ChunkShape(8, 0),)), 0.25)
    assert read_step_log(tmp_path / "steps.jsonl")[0] == [sample]


def test_a_steps_line_gives_the_collectors_time_inside_it(tmp_path):
    """What of a step's time the garbage collector took (this process's, by `gc.callbacks`):
    collections before the step or between steps are not the step's."""
    import gc

    clock = FakeClock()
    collector = CollectorTime(clock)
    rec = StepRecorder(StepLogWriter(tmp_path / "steps.jsonl"), clock, collector=collector)

    def collect(start: float, end: float) -> None:
        clock.now = start
        collector("start", {"generation": 2})
        clock.now = end
        collector("stop", {"generation": 2, "collected": 0})

    collect(0.0, 0.1)  # before any step
    first, second = object(), object()
    clock.now = 1.0
    rec.scheduled(first, [ScheduledRequest(8, 0, 8)])
    collect(1.1, 1.13)  # 30 ms inside the first step
    clock.now = 1.5
    rec.executed(first)
    collect(1.6, 1.7)  # between the steps
    clock.now = 2.0
    rec.scheduled(second, [ScheduledRequest(1, 8, 8)])
    clock.now = 2.2
    rec.executed(second)
    notes = [n for _, n in read_step_log_with_notes(tmp_path / "steps.jsonl")]
    assert notes[0]["gc_ms"] == pytest.approx(30.0) and "gc_ms" not in notes[1]

    live = CollectorTime().install()
    try:
        gc.collect()
        assert live.total_s > 0  # the real collector calls it
    finally:
        rec.close()  # NOTE: removes only its own collector
        live.remove()
    assert live not in gc.callbacks and collector not in gc.callbacks


def test_without_a_writer_steps_are_only_timed(tmp_path):
    """What the live latency model needs when no step log is asked for."""
    clock = FakeClock()
    rec, step = StepRecorder(None, clock), object()
    rec.scheduled(step, [ScheduledRequest(8, 0, 8)])
    clock.now = 0.5
    assert rec.executed(step) == Sample(StepShape((ChunkShape(8, 0),)), 0.5)
    rec.close()
    assert not list(tmp_path.iterdir())


def test_lines_carry_the_wall_clock_end_and_the_notes(tmp_path):
    clock = FakeClock()
    rec = StepRecorder(StepLogWriter(tmp_path / "steps.jsonl"), clock, wall_clock=lambda: 1795e6 + 0.5)
    step = object()
    rec.scheduled(step, [ScheduledRequest(8, 0, 8)], {"offline_tokens": 8, "kind": "offline"})
    clock.now = 0.1
    rec.executed(step)
    [(sample, notes)] = read_step_log_with_notes(tmp_path / "steps.jsonl")
    assert sample == Sample(StepShape((ChunkShape(8, 0),)), 0.1)
    assert notes == {"end_at": 1795e6 + 0.5, "offline_tokens": 8, "kind": "offline"}
    assert read_step_log_with_notes(tmp_path / "missing.jsonl") == []


def test_overlapped_steps_start_when_the_previous_one_is_done(tmp_path):
    """With a batch queue the next step is scheduled while this one still runs."""
    rec, clock = recorder(tmp_path)
    first, second = object(), object()
    rec.scheduled(first, [ScheduledRequest(1, 10, 5)])
    clock.now = 0.1
    rec.scheduled(second, [ScheduledRequest(1, 11, 5)])
    clock.now = 0.3
    assert rec.executed(first).step_s == 0.3
    clock.now = 0.5
    assert abs(rec.executed(second).step_s - 0.2) < 1e-12


def test_empty_and_unknown_steps_are_not_logged(tmp_path):
    rec, _ = recorder(tmp_path)
    empty = object()
    rec.scheduled(empty, [])
    assert rec.executed(empty) is None
    assert rec.executed(object()) is None
    assert read_step_log(tmp_path / "steps.jsonl") == ([], 0)


def test_engine_overrides_name_the_scheduler_and_the_log(tmp_path):
    overrides = engine_overrides(step_log=tmp_path / "s.jsonl")
    assert overrides["scheduler_cls"] == SCHEDULER_CLS
    assert step_log_path(overrides["additional_config"]) == str(tmp_path / "s.jsonl")
    assert step_log_path({}) is None and step_log_path({"conserve": {}}) is None


def test_plugin_config_entries_add_up_and_keep_the_rest(tmp_path):
    """serve adds the step log, then the policy; neither drops the other or vLLM's own keys."""
    policy = PolicyConfig(Targets(ttft_s=1.0, tbt_s=0.1), LatencyModel((0.01, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0)))
    first = engine_overrides({"other_plugin": 1}, step_log="s.jsonl")
    both = engine_overrides(first["additional_config"], policy=policy)
    assert both["scheduler_cls"] == SCHEDULER_CLS
    assert both["additional_config"]["other_plugin"] == 1
    assert conserve_config(both["additional_config"]) == {"step_log": "s.jsonl",
                                                          "policy": policy.to_dict()}
    assert conserve_config(None) == {} and conserve_config({"conserve": None}) == {}
    with pytest.raises(TypeError, match="step_logs"):
        engine_overrides(step_logs="typo.jsonl")
