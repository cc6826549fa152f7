"""Partial generations on the real engine: a generation continued from any partial ends with
the text of one uninterrupted greedy run, stop strings across the partial included. A
SIGKILLed `submit` whose `resume` continues every generation is tests/test_durability.py.

The pure splitting and joining, and the runner on the fake engine, are tests/test_partials.py;
`serve` drained mid-generation is tests/test_server.py.
"""

from __future__ import annotations

import pytest

from conserve_bench.store import WorkItem

pytestmark = pytest.mark.engine

UNTIL = ["\n\n\n\n"]  # as conserve_tiny_long: never met by these openings
MAX_TOKENS = 160


def generate(engine, work, partials=None) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Run `work` to the end: (texts, the longest token ids seen in flight) by key."""
    engine.submit(work, partials)
    texts, tokens = {}, {}
    while engine.num_pending_items:
        tokens.update(engine.partials())
        texts.update(engine.step())
    return texts, tokens


def items(openings, until=UNTIL, prefix="g") -> list[WorkItem]:
    return [WorkItem(f"{prefix}{i}", "generate_until",
                     [text, {"until": list(until), "max_gen_toks": MAX_TOKENS}])
            for i, text in enumerate(openings)]


def test_a_generation_continued_from_any_partial_ends_as_an_uninterrupted_one(engine, model_ref):
    from transformers import AutoTokenizer

    from .tasks.tiny import STORIES

    decode = AutoTokenizer.from_pretrained(model_ref.path).decode
    work = items(STORIES)
    whole, tokens = generate(engine, work)
    assert all(len(tokens[w.key]) == MAX_TOKENS - 1 for w in work)  # no early stop

    cuts = {w.key: cut for w, cut in zip(work, (1, 40, 97, MAX_TOKENS - 2))}
    before = engine.num_generated_tokens
    continued, _ = generate(engine, work, {key: tokens[key][:cut] for key, cut in cuts.items()})
    assert continued == whole
    # the saved tokens are not generated again
    assert engine.num_generated_tokens - before == sum(MAX_TOKENS - cut for cut in cuts.values())

    # A stop string across the partial: it begins in the saved text and ends in the
    # tokens generated after it, where vLLM (which checks only the text it generates) misses it.
    straddling, partials = [], {}
    for w in work:
        cut = 60
        seam = len(decode(tokens[w.key][:cut], skip_special_tokens=True))
        stop = whole[w.key][seam - 3:seam + 3]
        if len(stop) == 6 and whole[w.key].find(stop) == seam - 3:
            key = f"s{len(straddling)}"
            straddling.append(WorkItem(key, "generate_until", [w.args[0], {
                "until": [*UNTIL, stop], "max_gen_toks": MAX_TOKENS}]))
            partials[key] = (tokens[w.key][:cut], whole[w.key][:seam - 3])
    assert len(straddling) >= 2
    uninterrupted, _ = generate(engine, straddling)
    resumed, _ = generate(engine, straddling, {k: ids for k, (ids, _) in partials.items()})
    assert resumed == uninterrupted == {k: text for k, (_, text) in partials.items()}
