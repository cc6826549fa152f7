"""Where the linear step model is wrong by a step's size, and the model corrected there.

Owns the size classes (decode-only steps by their batch, the others by their prefill tokens
and whether decodes ride along) and `SizedModel`: a `LatencyModel` whose prediction is scaled
by its step's class's correction, with the budget inversions the planner needs. The
corrections themselves are measured live (`refit.SizeCorrections`); this module only applies
them. Plain data, no vLLM, no clock.

NOTE: why a correction and not another feature: on 2 CPU cores a decode batch of 2 ran
1.09-1.27x the linear model's prediction and batches of 3-4 0.88-0.99x in every run logged
(the matrix kernels change path with the batch), which no non-negative linear term can
follow, and the budget inversions need the linear part monotone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from conserve_bench.sched.latency import DEFAULT_MAX_TOKENS, LatencyModel, StepShape

# Size classes: (least, most) sizes, None = unbounded
DECODE_CLASSES = ((1, 1), (2, 2), (3, 4), (5, 8), (9, None))
PREFILL_CLASSES = ((1, 63), (64, 255), (256, 1023), (1024, None))
ALL_STEPS = "all steps"  # stored beside the classes: the correction of a class without its own


def size_class(shape: StepShape) -> str | None:
    """"decodes N-M" for a decode-only step, "prefill N-M" (its prefill tokens) for one with
    prefill chunks, "prefill N-M + decodes" with decodes beside them; None for no tokens."""
    if not shape.prefills:
        return _named("decodes", shape.num_decodes, DECODE_CLASSES) if shape.num_decodes else None
    name = _named("prefill", shape.num_prefill_tokens, PREFILL_CLASSES)
    return f"{name} + decodes" if name and shape.num_decodes else name


def _named(what: str, size: int, classes: tuple[tuple[int, int | None], ...]) -> str | None:
    return next((_name(what, low, high) for low, high in classes
                 if size >= low and (high is None or size <= high)), None)  # None: 0 tokens


def _name(what: str, low: int, high: int | None) -> str:
    return f"{what} {low}+" if high is None else f"{what} {low}" if low == high else f"{what} {low}-{high}"


@dataclass(frozen=True)
class SizedModel(LatencyModel):
    """A `LatencyModel` whose prediction for a step is scaled by its size class's entry in
    `corrections` (measured over predicted; `default` for a class without one). Plans like
    its base: the inversions find the most tokens within a budget class by class, each
    class's part of the base model being monotone, and price the work they add to a step at
    no less than that step's own correction (`predict_from`).

        SizedModel(model.coefficients, model.fit_error, {"decodes 2": 1.2}).predict(shape)
    """

    corrections: Mapping[str, float] = field(default_factory=dict)
    # NOTE: a class without steps of its own must not be priced below those with them: an
    # offline chunk beside online decodes (a class seen only once offline work joins) would
    # be priced by the bare model against online steps priced 1.3x over it, and fit a 5%
    # share it overran by 27-39% (a `serve` test on 2 cores). `SizeCorrections` gives the
    # median over all recent steps.
    default: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(f > 0 for f in (*self.corrections.values(), self.default)):
            raise ValueError(f"size corrections must be > 0: {dict(self.corrections)}, {self.default}")
        object.__setattr__(self, "corrections", MappingProxyType(dict(self.corrections)))

    @classmethod
    def of(cls, model: LatencyModel, corrections: Mapping[str, float], default: float = 1.0) -> SizedModel:
        return cls(model.coefficients, model.fit_error, corrections, default)

    @property
    def base(self) -> LatencyModel:
        return LatencyModel(self.coefficients, self.fit_error)

    def correction(self, shape: StepShape) -> float:
        return self._correction(size_class(shape))

    def _correction(self, name: str | None) -> float:
        return self.corrections.get(name, self.default) if name is not None else 1.0

    def predict(self, shape: StepShape) -> float:
        return super().predict(shape) * self.correction(shape)

    def predict_from(self, base_shape: StepShape, shape: StepShape) -> float:
        """`shape`, grown from `base_shape` by work added to it, priced at no less than
        `base_shape`'s correction: what the budget inversions hold within a budget.

        NOTE: adding work never makes a step faster, but two classes' corrections are medians
        over different steps: a few offline tokens beside one online decode ("prefill 1-63 +
        decodes", about 1.0) were priced below the decode alone ("decodes 1", about 1.2), and
        under the 5% share such steps ran 13-23% longer than online-only's decode steps of the
        same batch in `bench`."""
        return super().predict(shape) * max(self.correction(shape), self._floor(base_shape))

    def _floor(self, base_shape: StepShape) -> float:
        name = size_class(base_shape)
        return self._correction(name) if name is not None else 0.0

    def prefill_attention_s(self, shape: StepShape) -> float:
        return super().prefill_attention_s(shape) * self.correction(shape)

    def max_tokens_within(self, budget_s: float, base_shape: StepShape, context: int,
                          prompt_logprobs: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
        decodes = " + decodes" if base_shape.num_decodes else ""
        num_before, floor = base_shape.num_prefill_tokens, self._floor(base_shape)
        best = 0
        for least, most, name in _spans("prefill", PREFILL_CLASSES, num_before, max_tokens):
            within = super().max_tokens_within(budget_s / max(floor, self._correction(name + decodes)),
                                               base_shape, context, prompt_logprobs, most)
            best = max(best, within) if within >= least else best
        return best

    def max_decodes_within(self, budget_s: float, base_shape: StepShape, context_len: int,
                           max_decodes: int = DEFAULT_MAX_TOKENS) -> int:
        floor = self._floor(base_shape)
        if base_shape.prefills:  # NOTE: its class is the same for any number of decodes added
            name = size_class(base_shape.with_decodes([context_len]))
            return super().max_decodes_within(budget_s / max(floor, self._correction(name)),
                                              base_shape, context_len, max_decodes)
        best = 0
        for least, most, name in _spans("decodes", DECODE_CLASSES, base_shape.num_decodes, max_decodes):
            within = super().max_decodes_within(budget_s / max(floor, self._correction(name)),
                                                base_shape, context_len, most)
            best = max(best, within) if within >= least else best
        return best


def _spans(what: str, classes: tuple[tuple[int, int | None], ...], num_before: int,
           max_added: int) -> list[tuple[int, int, str]]:
    """(least, most) tokens added that put a step with `num_before` in each class it can
    reach with 1..max_added more, and the class's name."""
    spans = []
    for low, high in classes:
        least = max(1, low - num_before)
        most = max_added if high is None else min(max_added, high - num_before)
        if least <= most:
            spans.append((least, most, _name(what, low, high)))
    return spans
