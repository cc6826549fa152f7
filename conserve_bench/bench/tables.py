"""The `bench` report as tables: rows for the terminal (`cli.bench`) and `report.md`, from
`report.build_report`'s JSON. Formatting only; every number comes from the report."""

from __future__ import annotations

from typing import Any

from conserve_bench.bench.summary import PERCENTILES


TABLE_COLUMNS = ("policy", "TTFT p50/p90/p99 ms", "TBT p50/p90/p99 ms", "SLO %", "online req/s",
                 "offline tok/s", "offline items/s", "offline % of offline-only")


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of display strings per policy, in TABLE_COLUMNS order."""
    rows = []
    for policy, s in report["policies"].items():
        rows.append((policy, _triple(s["ttft_ms"]), _triple(s["tbt_ms"]),
                     _num(s["slo_attainment"], 100, 1), _num(s["online_rps"], 1, 2),
                     _num(s["offline_tokens_per_s"], 1, 1), _num(s["offline_items_per_s"], 1, 2),
                     _num(s["offline_pct_of_offline_only"], 1, 1)))
    return rows


def ratio_rows(report: dict[str, Any], names=("ttft_ms.p99", "tbt_ms.p99", "slo_attainment",
                                               "offline_tokens_per_s")) -> list[tuple[str, ...]]:
    """(policy, base, ratio per name) for every policy and ratio base but itself."""
    return [(policy, base.removeprefix("vs_"), *(_num(r[n], 1, 2) for n in names))
            for policy, s in report["policies"].items() for base, r in s["ratios"].items()
            if base != f"vs_{policy}"]


TAIL_COLUMNS = ("policy", "P99 TTFT x online-only [95% CI]", "P99 TBT x online-only [95% CI]",
                "P99 TPOT x online-only [95% CI]")


def tail_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per policy: its P99 ratios to online-only's with their bootstrap intervals."""
    rows = []
    for policy, s in report["policies"].items():
        intervals = (s.get("tail_intervals") or {}).get("vs_online-only")
        if intervals:
            rows.append((policy, *(interval_text(intervals[name]) for name in
                                   ("ttft_ms.p99", "tbt_ms.p99", "tpot_ms.p99"))))
    return rows


POOLED_COLUMNS = ("policy", "rounds", "requests", "SLO %", "online-only SLO %", "difference (points)",
                  "offline tok/s", "slack tok/s", "% of slack", "P99 TTFT x online-only [95% CI]",
                  "P99 TBT x online-only [95% CI]", "P99 TPOT x online-only [95% CI]")


def pooled_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per `--policies` entry over its rounds (`summary.pool_rounds`; none with one round)."""
    rows = []
    for entry, p in (report.get("pooled") or {}).items():
        tails = p["tail_intervals"] or {}
        rows.append((entry, str(p["rounds"]), str(p["requests"]), _num(p["slo_attainment"], 100, 1),
                     _num(p["online_only_slo_attainment"], 100, 1), _num(p["slo_attainment_difference"], 100, 1),
                     _num(p["offline_tokens_per_s"], 1, 1), _num(p["slack_tokens_per_s"], 1, 1),
                     _num(p["harvest_pct_of_slack"], 1, 1),
                     *(interval_text(tails[name]) if name in tails else "-"
                       for name in ("ttft_ms.p99", "tbt_ms.p99", "tpot_ms.p99"))))
    return rows


def interval_text(r: dict[str, Any]) -> str:
    """A ratio with its bootstrap interval (`summary.tail_intervals`): `1.20x [1.10, 1.33]`."""
    if r["ratio"] is None:
        return "-"
    return f"{r['ratio']:.2f}x [{_num(r['low'], 1, 2)}, {_num(r['high'], 1, 2)}]"


STEP_COLUMNS = ("policy", "steps", "busy %", "online / mixed / offline busy %",
                "mixed step p50/p90/p99 ms", "offline computed tok/s", "prediction error p50/p90",
                "same-shape spread p50/p90", "profile / refit error p90 (same steps)")
GOAL_COLUMNS = ("policy", "SLO %", "online-only SLO %", "ratio", "difference (points)",
                "online req/s", "offline tok/s", "slack tok/s", "% of slack")


def goal_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per policy with a goal: attainment next to online-only's, and harvest next to the slack."""
    rows = []
    for policy, s in report["policies"].items():
        g = s.get("goal")
        if not g:
            continue
        # NOTE: records of 2026-11-27 and before may lack the difference and computed tok/s
        rows.append((policy, _num(g["slo_attainment"], 100, 1), _num(g["online_only_slo_attainment"], 100, 1),
                     _num(g["slo_attainment_ratio"], 1, 2), _num(g.get("slo_attainment_difference"), 100, 1),
                     _num(s["online_rps"], 1, 2), _num(s["offline_tokens_per_s"], 1, 1),
                     _num(g["slack_tokens_per_s"], 1, 1), _num(g["harvest_pct_of_slack"], 1, 1)))
    return rows


def step_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per policy with a step log: how the engine spent the window (STEP_COLUMNS order)."""
    rows = []
    for policy, s in report["policies"].items():
        steps = s.get("steps")
        if not steps:
            continue
        kinds = steps["by_kind"]
        error, models = steps["prediction_rel_error"], steps.get("model_rel_error")
        spread = steps.get("shape_spread_rel")
        rows.append((policy, str(steps["num_steps"]), _num(steps["busy_pct"], 1, 1),
                     " / ".join(_num(kinds[k]["busy_pct"], 1, 1) for k in ("online", "mixed", "offline")),
                     _triple(kinds["mixed"]["step_ms"]), _num(steps.get("offline_computed_tokens_per_s"), 1, 1),
                     "-" if error is None else f"{error['p50']:.1%} / {error['p90']:.1%}",
                     "-" if not spread else f"{spread['p50']:.1%} / {spread['p90']:.1%}",
                     "-" if not models else
                     f"{models['profile']['p90']:.1%} / {models['refit']['p90']:.1%} ({models['num_steps']})"))
    return rows


CLASS_COLUMNS = ("policy", "step class", "steps", "measured / predicted p10 / p50 / p90")


def class_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per policy with predictions and step class: where the plan's latency model is wrong."""
    rows = []
    for policy, s in report["policies"].items():
        for name, c in ((s.get("steps") or {}).get("prediction_by_class") or {}).items():
            rows.append((policy, name, str(c["num_steps"]),
                         " / ".join(_num(c[p], 1, 2) for p in ("p10", "p50", "p90"))))
    return rows


PREEMPTION_COLUMNS = ("policy", "preemptions", "arrival to abort p50/p99 ms",
                      "layer group p50/p99 ms", "layer reached p50 (min-max)",
                      "offline tokens discarded", "run out (arrival to end p50/p99 ms)",
                      "online queue p50/p99 ms")


def preemption_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per policy with a step log: layer-wise preemptions and the server-side online queue."""
    rows = []
    for policy, s in report["policies"].items():
        p, queue = s.get("preemptions"), s.get("online_queue_ms")
        if not p and not queue:
            continue
        # NOTE: records of 2026-11-27 and before give preemptions of conserve alone, and
        # only their number and arrival to abort
        p = p or {}
        layer, group = p.get("abort_layer") or {"p50": None}, p.get("layer_group_ms")
        rows.append((policy, str(p.get("num_preemptions", "-")),
                     _pair(p["arrival_to_abort_ms"]) if p else "-", _pair(group) if group else "-",
                     "-" if layer["p50"] is None else f"{layer['p50']:.0f} ({layer['min']}-{layer['max']})",
                     str(p.get("offline_tokens_discarded", "-")), _run_out(p), _pair(queue) if queue else "-"))
    return rows


KV_RESUME_COLUMNS = ("policy", "KV preemptions resumed", "tokens computed before",
                     "loaded", "prefix-cached", "recomputed", "recomputed per resume p50/p99")


def kv_resume_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per policy with a step log: offline requests preempted for KV blocks, and what their
    resumes loaded from KV checkpoints or computed again."""
    rows = []
    for policy, s in report["policies"].items():
        k = s.get("kv_resumes")
        if not k:
            continue
        rows.append((policy, str(k["num_resumes"]), str(k["progress_tokens"]),
                     str(k["loaded_tokens"]), str(k["prefix_cached_tokens"]),
                     str(k["recomputed_tokens"]), _pair(k["recomputed_tokens_per_resume"])))
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    cfg, off = report["config"], report["offline_only"]
    lines = [f"# conserve-bench bench ({cfg.get('started_at', '')})", "",
             f"Model {cfg['model']}; online: {cfg['workload']}; offline: {cfg['offline_tasks']}; "
             f"SLOs: TTFT {cfg['ttft_slo_ms']:.0f} ms, TBT {cfg['tbt_slo_ms']:.0f} ms "
             f"({cfg.get('slo_source', 'given')}); "
             f"window {off['window_s']:.1f} s; offline-only: {off['offline_tokens_per_s']:.1f} tok/s, "
             f"{off['offline_items_per_s']:.2f} items/s.", ""]
    lines += _md_table(TABLE_COLUMNS, table_rows(report))
    lines += ["", f"{report['goal'][:1].upper()}{report['goal'][1:]}.", ""]
    lines += _md_table(GOAL_COLUMNS, goal_rows(report))
    lines += ["", "Ratios (policy / base):", ""]
    lines += _md_table(("policy", "base", "TTFT p99", "TBT p99", "SLO attainment", "offline tok/s"),
                       ratio_rows(report))
    if rows := tail_rows(report):
        lines += ["", "Tails against online-only, with a 95% bootstrap interval from this run "
                  "(requests resampled): a 1.05x target is met where the interval's top is "
                  "below it, missed where its bottom is above it.", ""]
        lines += _md_table(TAIL_COLUMNS, rows)
    if rows := pooled_rows(report):
        lines += ["", "Each entry over its rounds (alternated, so the host's drift between phases falls on "
                  "every policy alike): online requests pooled against online-only's, attainment and "
                  "offline tokens/s averaged over rounds.", ""]
        lines += _md_table(POOLED_COLUMNS, rows)
    if rows := step_rows(report):
        lines += ["", "Engine steps in the window (server step logs; a step counts by its share "
                  "inside the window):", ""]
        lines += _md_table(STEP_COLUMNS, rows)
    if rows := class_rows(report):
        lines += ["", "Where the latency model is wrong: each step's measured over predicted time, by "
                  "step class (decode-only steps by batch, the others by prefill tokens; classes of "
                  "8 steps or more):", ""]
        lines += _md_table(CLASS_COLUMNS, rows)
    if rows := preemption_rows(report):
        lines += ["", "Layer-wise preemption and the server-side online queue (step logs):", ""]
        lines += _md_table(PREEMPTION_COLUMNS, rows)
    if rows := kv_resume_rows(report):
        lines += ["", "Offline requests preempted for KV blocks, resumed (step logs):", ""]
        lines += _md_table(KV_RESUME_COLUMNS, rows)
    lines += ["", "![latency CDFs](latency_cdf.png)", "", "![offline throughput](offline_throughput.png)", ""]
    return "\n".join(lines)


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _triple(values: dict[str, float | None]) -> str:
    return "/".join(_num(values[f"p{p}"], 1, 0) for p in PERCENTILES)


def _run_out(preemptions: dict[str, Any]) -> str:
    """Steps an arrival let run out, and its wait for their end (older records have neither:
    "-")."""
    if "num_run_out" not in preemptions:
        return "-"
    if not preemptions["num_run_out"]:
        return "0"
    return f"{preemptions['num_run_out']} ({_pair(preemptions['arrival_to_end_ms'])})"


def _pair(values: dict[str, float | None]) -> str:
    return f"{_num(values['p50'], 1, 1)}/{_num(values['p99'], 1, 1)}"


def _num(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"
