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
while the engine has no online work (times are given, never read here), which sizes
offline-only steps (`policy.offline_step_for`).
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

    def awaits(self) -> bool:
        """Whether any arrival that cut a step still waits for its request to run."""
        return bool(self._in_hand_off)

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
    """How often online arrivals end time without online work: the arrivals that came while
    the engine had none, over the last NUM_RECENT_ARRIVALS of them, per second of such time
    since the first, so the estimate decays while none arrives. The scheduler says at every
    step whether online work is present (`online_work`) and reports each arrival (`observe`).

    NOTE: this, not arrivals per second of wall time, is the rate at which offline-only steps
    are cut: those run only while the engine has no online work, and an arrival while online
    work runs cuts nothing. Under Poisson arrivals the two are equal; online traffic comes in
    bursts, mostly while online work is running. In a `bench` of the conversation trace,
    2.7 requests a second arrived, and 1.2 a second of the engine's online-free time; a
    replay of online-only's 20 idle periods kept 79% of the slack at the first's step length
    (0.14 s) and 86% at the second's (0.22 s); no fixed length tried from 0.1 to 0.55 s kept
    more. Example:

        rate = ArrivalRate()
        rate.online_work(False, 10.0)  # no online work from t=10
        rate.observe(11.0)             # counted
        rate.online_work(True, 11.0)   # online work 11-15: arrivals then are not counted
        rate.online_work(False, 15.0)
        rate.observe(16.0)
        rate.per_s(17.0)               # 1.0: two arrivals, 2 s without online work since the first
    """

    def __init__(self, num_recent: int = NUM_RECENT_ARRIVALS):
        self._exposures: deque[float] = deque(maxlen=num_recent)  # the clock below, at each
        self._exposed_s = 0.0  # seconds without online work, up to `_since`
        self._since: float | None = None  # without online work since then; None: it has some

    def online_work(self, present: bool, now_s: float) -> None:
        """Whether the engine has online work as of `now_s` (at every step)."""
        if present and self._since is not None:
            self._exposed_s += max(0.0, now_s - self._since)
            self._since = None
        elif not present and self._since is None:
            self._since = now_s

    def observe(self, at_s: float) -> None:
        """An online request arrived at `at_s`; counted if the engine had no online work."""
        if self._since is not None:
            self._exposures.append(self._exposed(at_s))

    def per_s(self, now_s: float) -> float | None:
        """None before two arrivals: one tells no rate."""
        if len(self._exposures) < 2:
            return None
        return len(self._exposures) / max(self._exposed(now_s) - self._exposures[0], 1e-3)

    def _exposed(self, now_s: float) -> float:
        return self._exposed_s + (max(0.0, now_s - self._since) if self._since is not None else 0.0)
