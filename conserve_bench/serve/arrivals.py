"""An online request's arrival number, from the guard that admits it to the engine that runs it.

The guard announces every online request it admits (`vllm_plugin.arrivals.ArrivalSignal`:
the running offline step is cut while one waits) and keeps its number in `ADMITTED` while
vLLM's app serves it; `tag_arrivals` makes the engine client's `generate` put that number in
the request's `SamplingParams.extra_args` (vLLM's field for plugins), so the engine's
scheduler can tell when a step schedules it, whatever the hand-off took. Requests the app
sends without an admission (the offline pump's) are left as they are.

vLLM names relied on: docs/vllm-contract.md#guard.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar

from conserve_bench.vllm_plugin.arrivals import hooked_ints
from conserve_bench.vllm_plugin.overrides import ARRIVAL_KEY

# NOTE: a context variable: each HTTP request runs in its own task, and the tasks vLLM's app
# starts for it (a streaming response's) copy it.
ADMITTED: ContextVar[int | None] = ContextVar("conserve_admitted", default=None)


def tag_arrivals(client) -> None:
    """Wrap `client.generate` (vLLM's `AsyncLLM`, which every OpenAI route calls) to carry
    `ADMITTED`'s number into the engine."""
    generate = client.generate
    delay = hooked_ints("serve.handoff_delay_ms")

    def tagged(prompt, sampling_params, *args, **kwargs):
        number = ADMITTED.get()
        if number is not None and hasattr(sampling_params, "extra_args"):  # NOTE: not pooling
            sampling_params.extra_args = {**(sampling_params.extra_args or {}), ARRIVAL_KEY: number}
        delay_ms = delay.read() if number is not None and delay is not None else 0
        if delay_ms > 0:
            return _delayed(delay_ms / 1e3, generate(prompt, sampling_params, *args, **kwargs))
        return generate(prompt, sampling_params, *args, **kwargs)

    client.generate = tagged


async def _delayed(delay_s: float, outputs):
    """The fault suite's slow hand-off: `outputs` (not started yet) after `delay_s`."""
    await asyncio.sleep(delay_s)
    async with contextlib.aclosing(outputs):
        async for output in outputs:
            yield output
