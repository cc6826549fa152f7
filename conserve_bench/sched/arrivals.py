"""Which online arrivals still wait for the engine: the rule that decides when a step is cut.

`serve` numbers every online request it admits, from 1, in order (`vllm_plugin.arrivals.
ArrivalSignal`), and the number travels with the request into the engine. An arrival is
*pending* until a step schedules its request or a step is cut for it; an offline-only step is
cut while any arrival is pending, so every arrival cuts at most one step however long its
hand-off to the engine takes (tokenising a long prompt, a loaded event loop), and none after
its request runs. A step is cut as soon as the arrival is announced, usually before its
request has reached the scheduler: until it does (`in_hand_off`), offline work waits rather
than start a step the request would wait behind. An admitted request that never reaches the
engine (refused by vLLM's checks, its client gone) cuts one step and holds offline work for
at most the hand-off limit the scheduler gives.

Pure bookkeeping on plain integers: the scheduler reports what it scheduled and what was cut,
and arms each offline-only step with `cut_above`: the safepoint cuts the step once the number
of arrivals announced exceeds it. `ArrivalRate` estimates how often online requests arrive
(times are given, never read here), which sizes offline-only steps (`policy.offline_step_for`).
"""

from __future__ import annotations

from collections import deque

NUM_RECENT_ARRIVALS = 16


class ArrivalBook:
    """The arrivals settled so far: every number up to `cut_above`, and a few beyond it
    (scheduled out of order: a short prompt's hand-off overtook a long one's). Example:

        book = ArrivalBook()
        book.scheduled(2)        # arrival 2's request ran in a step; 1 is still on its way
        book.cut_above           # 0: a step is cut while arrival 1 is pending
        book.cut_for(2)          # a step was cut when 2 arrivals had been announced
        book.cut_above           # 2: neither cuts again
    """

    def __init__(self) -> None:
        # An offline-only step is cut once more arrivals than this were announced: the first
        # arrival not settled is announced then (every one up to this is settled).
        self.cut_above = 0
        self._settled_beyond: set[int] = set()  # beyond it: arrivals whose requests ran
        self._in_hand_off: dict[int, float] = {}  # cut a step, request not run yet: when

    def scheduled(self, number: int) -> None:
        """A step scheduled the request of arrival `number` (no step is cut for it after)."""
        self._in_hand_off.pop(number, None)
        if number > self.cut_above:
            self._settled_beyond.add(number)
            self._advance()

    def in_hand_off(self, now_s: float, limit_s: float) -> bool:
        """Whether an arrival cut a step less than `limit_s` ago and its request has not run
        yet (offline work waits for it); those cut longer ago are let go."""
        self._in_hand_off = {n: at for n, at in self._in_hand_off.items() if now_s - at < limit_s}
        return bool(self._in_hand_off)

    def cut_for(self, num_announced: int, at_s: float = 0.0) -> None:
        """A step was cut at `at_s` when `num_announced` arrivals had been announced: each was
        pending or settled then; none cuts another step, and those whose requests have not
        run are in their hand-off."""
        if num_announced > self.cut_above:
            for number in range(self.cut_above + 1, num_announced + 1):
                if number not in self._settled_beyond:
                    self._in_hand_off[number] = at_s
            self.cut_above = num_announced
            self._settled_beyond = {n for n in self._settled_beyond if n > num_announced}
            self._advance()

    def _advance(self) -> None:
        while self.cut_above + 1 in self._settled_beyond:
            self.cut_above += 1
            self._settled_beyond.remove(self.cut_above)


class ArrivalRate:
    """Online arrivals per second, over the last NUM_RECENT_ARRIVALS: their count over the time
    since the first of them, so the estimate decays while none arrives. Example:

        rate = ArrivalRate()
        rate.observe(10.0); rate.observe(11.0)
        rate.per_s(12.0)         # 1.0: two arrivals in the last two seconds
        rate.per_s(30.0)         # 0.1: and none in the 18 since
    """

    def __init__(self, num_recent: int = NUM_RECENT_ARRIVALS):
        self._times: deque[float] = deque(maxlen=num_recent)

    def observe(self, at_s: float) -> None:
        self._times.append(at_s)

    def per_s(self, now_s: float) -> float | None:
        """None before two arrivals: one tells no rate."""
        if len(self._times) < 2:
            return None
        return len(self._times) / max(now_s - self._times[0], 1e-3)
