"""Online workloads, pure: trace reading, rescaling, Gamma arrivals, token counts, prompts."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.bench.workload import (OnlineRequest, TraceError, gamma_arrivals, mean_rate,
                                     prompt_token_ids, read_azure_trace, rescale_to_rate,
                                     scale_tokens, with_arrivals)

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"

arrival_lists = st.lists(st.floats(0, 1e4, allow_nan=False), min_size=2, max_size=50).map(sorted)


def _requests(arrivals, context=100, generated=10):
    return [OnlineRequest(t, context, generated) for t in arrivals]


def test_reads_the_azure_trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n"
                    "2023-11-16 18:16:46.6805900,5,1\n")
    requests = read_azure_trace(path)
    assert [r.context_tokens for r in requests] == [374, 396, 5]
    assert [r.generated_tokens for r in requests] == [44, 109, 1]
    assert requests[0].arrival_s == 0.0
    assert requests[1].arrival_s == pytest.approx(4.314579)
    assert requests[2].arrival_s == pytest.approx(60.0)
    assert len(read_azure_trace(path, max_requests=2)) == 2


def test_bad_traces_are_one_line_errors(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        read_azure_trace(tmp_path / "missing.csv")
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match="lacks columns"):
        read_azure_trace(tmp_path / "cols.csv")
    (tmp_path / "bad.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(TraceError, match="bad.csv"):
        read_azure_trace(tmp_path / "bad.csv")


@pytest.mark.skipif(not TRACE.is_file(), reason="shared trace not present")
def test_shared_trace_is_sorted_and_positive():
    requests = read_azure_trace(TRACE, max_requests=2000)
    assert len(requests) == 2000
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(requests, requests[1:]))
    assert all(r.context_tokens > 0 and r.generated_tokens > 0 for r in requests)


@given(arrival_lists, st.floats(0.01, 100))
def test_rescaling_hits_the_rate_and_keeps_the_shape(arrivals, rate):
    requests = _requests(arrivals)
    rescaled = rescale_to_rate(requests, rate)
    assert [r.arrival_s for r in rescaled] == sorted(r.arrival_s for r in rescaled)
    assert rescaled[0].arrival_s == 0.0
    if mean_rate(requests) > 0:
        assert mean_rate(rescaled) == pytest.approx(rate, rel=1e-6)
        span = arrivals[-1] - arrivals[0]
        for before, after in zip(requests, rescaled):  # relative positions are kept
            assert after.arrival_s / rescaled[-1].arrival_s == pytest.approx(
                (before.arrival_s - arrivals[0]) / span, abs=1e-9)


@given(st.integers(1, 200), st.floats(0.1, 50), st.floats(0.2, 4), st.integers(0, 2**16))
@settings(max_examples=50)
def test_gamma_arrivals_are_sorted_seeded_and_start_at_zero(num, rate, cv, seed):
    arrivals = gamma_arrivals(num, rate, cv, seed)
    assert len(arrivals) == num and arrivals[0] == 0.0
    assert arrivals == sorted(arrivals)
    assert arrivals == gamma_arrivals(num, rate, cv, seed)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_rate_and_cv(cv):
    arrivals = gamma_arrivals(100_000, rate=5.0, cv=cv, seed=1)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 5.0, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.1)


@given(st.lists(st.tuples(st.integers(1, 20_000), st.integers(1, 5_000)), min_size=1, max_size=30),
       st.floats(0.01, 4), st.integers(1, 4096), st.integers(1, 1024))
def test_token_counts_are_scaled_then_capped(sizes, scale, max_context, max_generated):
    requests = [OnlineRequest(float(i), c, g) for i, (c, g) in enumerate(sizes)]
    scaled = scale_tokens(requests, scale, max_context, max_generated)
    for before, after in zip(requests, scaled):
        assert after.arrival_s == before.arrival_s
        for tokens, scaled_tokens, cap in ((before.context_tokens, after.context_tokens, max_context),
                                           (before.generated_tokens, after.generated_tokens, max_generated)):
            wanted = round(tokens * scale)  # scaled, then at least 1 and at most the cap
            assert scaled_tokens == (1 if wanted < 1 else cap if wanted > cap else wanted)
    assert scale_tokens(requests, 1.0, 10**6, 10**6) == requests  # scale 1, no cap: unchanged


def test_with_arrivals_keeps_token_counts_in_order():
    requests = [OnlineRequest(0.0, c, c + 1) for c in (5, 6, 7)]
    timed = with_arrivals(requests, [2.0, 0.5, 1.0])
    assert [(r.arrival_s, r.context_tokens) for r in timed] == [(0.5, 5), (1.0, 6), (2.0, 7)]


@given(st.integers(1, 3000), st.integers(0, 100), st.integers(0, 1000))
@settings(max_examples=30)
def test_prompts_have_exactly_the_token_count_and_are_reproducible(num_tokens, seed, index):
    ids = prompt_token_ids(num_tokens, seed, index)
    assert len(ids) == num_tokens
    assert ids == prompt_token_ids(num_tokens, seed, index)
    assert all(100 <= i < 30_000 for i in ids)
    if num_tokens >= 8:
        assert ids != prompt_token_ids(num_tokens, seed, index + 1)  # no shared prefixes
