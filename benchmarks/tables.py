"""The docs' measured tables, generated from the committed records of benchmarks/measured/.

A docs page holds a block per record between `<!-- measured:NAME -->` and
`<!-- /measured:NAME -->` (NAME: a file `measured/NAME.json`, or the folder `measured/NAME/`
of a sharded run); this module rewrites each block from its record, a renderer per benchmark.
It never types a number: a renderer prints what the record holds ('-' where it holds none).

    python -m benchmarks.tables                  # rewrite the blocks of docs/*.md
    python -m benchmarks.tables --check          # exit 1 if a block differs from its record
    python -m benchmarks.tables --show kv_churn  # print one record's block
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import (MEASURED_DIR, REPO, Measured, host_line, md_table, num, pct, times,
                               yes)

BLOCK = re.compile(r"(?P<open><!-- measured:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)"
                   r"(?P<close><!-- /measured:(?P=name) -->)", re.S)


# --- the benchmarks of this package ------------------------------------------------------------

def gc_pause(result: dict, config: dict) -> str:
    rows = [(name, num(result[mode]["collect_ms"], 1), num(result[mode]["max_stall_ms"]),
             num(result[mode]["num_stalls_over_50ms"]))
            for mode, name in (("plain", "as lm-eval leaves it"), ("frozen", "frozen (`gc.freeze`)"))]
    table = md_table(("heap", "full collection ms (median of 5)", "event loop's largest stall ms",
                      "stalls > 50 ms (most in a run)"), rows)
    return (f"{table}\n\n{config['task']} {config['num_fewshot']}-shot: {num(result['num_requests'])} "
            f"lm-eval requests, {num(result['tracked_objects'])} objects the collector tracks; the "
            f"other thread kept {num(config['items'])} result objects per run, two runs per heap.")


def online_step_cost(result: dict, config: dict) -> str:
    shapes = (("prefill_ms", "a 256-token online prefill alone"), ("decode_1_ms", "one online decode"),
              ("decode_4_8_ms", "4-8 online decodes"))
    runs = result["runs"]

    def per_round(shape: str, name: str) -> str:
        return ", ".join(times(c[shape] / o[shape]) for o, c in zip(runs["online-only"], runs[name]))

    rows = [(label, num(result["online-only"][shape], 1), num(result["conserve"][shape], 1),
             f"{times(result['ratio'][shape])} ({per_round(shape, 'conserve')})",
             num(result["conserve-held"][shape], 1),
             f"{times(result['held_ratio'][shape])} ({per_round(shape, 'conserve-held')})")
            for shape, label in shapes]
    table = md_table(("step (no offline token in it)", "online-only engine ms",
                      "conserve's mechanisms ms (connector, worker)", "/ online-only (each round)",
                      f"conserve whole ms ({result['num_held']} offline requests held)",
                      "/ online-only (each round)"), rows)
    return (f"{table}\n\nMedians over {config['rounds']} alternated rounds of fresh engines, each the "
            f"median of its steps ({config['prompts']} requests one at a time, then 4 and 8 together).")


def layer_preemption(result: dict, config: dict) -> str:
    from benchmarks.layer_preemption import TARGET_OVERHEAD

    o, a = result["overhead"], result["arrivals"]
    cost = "" if o.get("overhead") is None else f" (cost {pct(o['overhead'])})"
    group, to_abort = a["layer_group_ms"], a["arrival_to_abort_ms"]
    rows = [
        (f"offline tokens/s, armed safepoints that never fire vs none (median of {config['rounds']} "
         "alternating rounds)", f"{num(o['armed_median'], 1)} vs {num(o['plain_median'], 1)}{cost}",
         f"armed >= {1 - TARGET_OVERHEAD:.0%}"),
        (f"arrival to abort p50 / p99 ({a['num_arrivals']} arrivals during {config['long_tokens']}-token "
         f"offline prefills, {a['num_preemptions']} steps cut)", f"{num(to_abort['p50'])} / {num(to_abort['p99'])} ms",
         f"p99 <= one layer group p99 + 5 ms = {num(a['target_ms'])} ms"),
        (f"one layer group ({config['safepoint_every']} layers) p50 / p99",
         f"{num(group['p50'])} / {num(group['p99'])} ms", ""),
        ("an uncut step of the same prefill, p50", f"{num(a['complete_step_ms_p50'])} ms", ""),
        ("outputs of cut-and-redone steps", "equal to the uninterrupted run"
         if a["outputs_equal_uninterrupted"] else "**differ** from the uninterrupted run", "equal"),
    ]
    return md_table(("what", "measured", "target"), rows)


def kv_checkpoint(result: dict, config: dict) -> str:
    o = result["overhead"]
    cost = "" if o.get("overhead") is None else f" (cost {pct(o['overhead'])})"
    overhead = md_table(("what", "measured", "target"), [(
        "offline tokens/s, nothing preempted, checkpoints on vs off (median of alternating rounds)",
        f"{num(o['on_median'], 1)} vs {num(o['off_median'], 1)}{cost}", f"on >= {1 - o['target']:.0%} of off")])
    resume = md_table(("context tokens", "recompute ms per 1k", "load ms per 1k", "save ms per 1k",
                       "recompute / load"),
                      [(num(r["context_tokens"]), num(r["recompute_ms_per_1k"]), num(r["load_ms_per_1k"], 1),
                        num(r["save_ms_per_1k"], 1), times(r["recompute_over_load"], 0)) for r in result["resume"]])
    return f"{overhead}\n\n{resume}"


def kv_churn(result: dict, config: dict) -> str:
    from benchmarks.kv_churn import TARGET_LATENCY, TARGET_SPEEDUP

    names = {"on": f"checkpoints ({config['pool_gib']:g} GiB pool)", "off": "no checkpoints"}
    rows = [_churn_row(names[arm], result["arms"][arm]) for arm in ("on", "off")]
    table = md_table(("arm", "offline tok/s (rounds)", "resumes", "tokens loaded / prefix-cached / recomputed",
                      "recomputed per resume p50", "online TTFT p50/p99 ms", "TBT p50/p99 ms", "bursts"), rows)
    r = result["ratios"]
    rounds = ", ".join(times(x) for x in r["per_round"])
    return (f"{table}\n\nOffline tokens/s with checkpoints {times(r['offline_tokens_per_s'])} without "
            f"(round by round {rounds}; target >= {TARGET_SPEEDUP}x), online P99 TTFT "
            f"{times(r['ttft_ms_p99'])} and P99 TBT {times(r['tbt_ms_p99'])} (target <= {TARGET_LATENCY}x): "
            f"{'met' if result['met'] else '**not met**'}.")


def _churn_row(name: str, a: dict) -> tuple[str, ...]:
    rounds = ", ".join(num(x, 1) for x in a["offline_tokens_per_s"])
    return (name, f"{num(a['offline_tokens_per_s_median'], 1)} ({rounds})", num(a["num_resumes"]),
            f"{num(a['loaded_tokens'])} / {num(a['prefix_cached_tokens'])} / {num(a['recomputed_tokens'])}",
            num(a["recomputed_per_resume_p50"]), f"{a['ttft_ms_p50']:.0f} / {a['ttft_ms_p99']:.0f}",
            f"{a['tbt_ms_p50']:.0f} / {a['tbt_ms_p99']:.0f}", num(a["num_bursts"]))


def latency_accuracy(result: dict, config: dict) -> str:
    from benchmarks.latency_accuracy import NUM_SPLITS, TARGET_MEDIAN, TARGET_P90

    rows = [("all shapes", result["holdout_error"]), *result["holdout_by_kind"].items(),
            ("every held-out step on its own", result["holdout_error_per_step"])]
    table = md_table(("held out", "n", "median", "P90", "max"),
                     [(name, str(e["num_samples"]), pct(e["median_rel"]), pct(e["p90_rel"]), pct(e["max_rel"]))
                      for name, e in rows])
    spread, c = result["holdout_over_splits"], result["coefficients"]
    return (f"{table}\n\nTargets: median <= {TARGET_MEDIAN:.0%}, P90 <= {TARGET_P90:.0%}. Over {NUM_SPLITS} "
            f"random splits of the shapes: median {_span(spread['median_rel'])}, P90 {_span(spread['p90_rel'])}. "
            f"Fitted: {num(c['fixed'], 1, 1e3)} ms per step, {num(c['prefill_tokens'], 2, 1e3)} ms per prefill "
            f"token, {num(c['decodes'], 2, 1e3)} ms per decode, {num(c.get('logprob_tokens'), 2, 1e3)} ms more "
            f"per prompt-logprob token ({config['sweep']} sweep, {num(result['num_samples'])} steps).")


def _span(values: list[float]) -> str:
    return f"{min(values):.1%}-{max(values):.1%}"


def lm_eval_speed(result: dict, config: dict) -> str:
    names = {"conserve": "`conserve` (embedded)", "hf": "`hf`",
             "local-completions": "`local-completions` -> `serve`", "conserve-client": "`conserve` client -> `serve`"}
    rows = [(names.get(b, b), num(r["num_requests"]), num(r["load_s"], 1), num(r["eval_s"], 1),
             num(_rate(r, "eval_rps", r["num_requests"], r["eval_s"]), 2), num(r["total_s"], 1),
             num(_rate(r, "total_rps", r["num_requests"], r["total_s"]), 2)) for b, r in result["backends"].items()]
    table = md_table(("backend", "requests", "model load s", "eval s", "eval req/s", "process wall s",
                      "end-to-end req/s"), rows)
    return (f"{table}\n\nServer start-up (not in the HTTP rows): {num(result['server_start_s'], 1)} s; "
            f"accuracy identical across backends: {yes(result['same_accuracy'])}.")


def lm_eval_dropin(result: dict, config: dict) -> str:
    rows = [(variant, num(r["num_requests"]), f"{r['max_logprob_diff_nats']:.1e}", yes(r["is_greedy_equal"]),
             yes(r["generations_equal"]), yes(r["same_scores"]),
             f"{num(r['vllm_wall_s'])} / {num(r['conserve_wall_s'])}")
            for variant, r in result["variants"].items()]
    table = md_table(("variant", "requests", "max |Δ logprob| (nats)", "is_greedy equal", "generations equal",
                      "scores equal", "wall s (`vllm` / `conserve`)"), rows)
    return f"{table}\n\nBoth with `--model_args {result['model_args']}` (`$MODEL_DIR`: the converted SmolLM2-135M-Instruct), lm-eval's command line otherwise the same."


def score_independence(result: dict, config: dict) -> str:
    rows = [(name, num(r["num_requests"]), f"{r['max_logprob_diff']:.1e}", num(r["is_greedy_flips"]),
             num(r["texts_differ"]), yes(r["scores_equal"]), num(r["arrival_cuts"]),
             f"{num(r['kv_resumes_loaded'])} / {num(r['kv_resumes'])}", num(r["online_sent"]),
             num(r["wall_s"], 1))
            for name, r in result["runs"].items()]
    table = md_table(("run", "requests", "max |Δ logprob| (nats)", "is_greedy flips", "texts differ",
                      "scores equal", "steps cut by arrivals", "KV resumes (loaded / all)",
                      "online requests", "offline wall s"), rows)
    return (f"{table}\n\nEach against the same jobs run by `submit` alone. The deterministic mode's "
            f"throughput cost (its loaded run's offline wall time over the default's): "
            f"{times(result['deterministic_throughput_cost'])}.")


def batch_api(result: dict, config: dict) -> str:
    """The rows of the runs the record holds (`--phases`; records before it hold all but A/A)."""
    from conserve_bench.bench.tables import interval_text

    a = result["alone"]

    def tails(ratios: dict) -> str:
        return ", ".join(f"{label} {interval_text(ratios[name])}" for label, name in
                         (("TTFT", "ttft_ms.p99"), ("TBT", "tbt_ms.p99"), ("TPOT", "tpot_ms.p99")))

    rows = [("alone on `serve` (its defaults), no online traffic",
             f"{num(a['wall_s'], 1)} s: {num(a['lines_per_s'], 2)} lines/s, {num(a['completion_tokens_per_s'], 1)} tok/s", "-")]
    if (v := result.get("vllm_run_batch")) is not None:
        rows += [("`vllm run-batch`, same file and engine",
                  f"{num(v['processing_s'], 1)} s (+{num(v['startup_s'], 1)} s start-up): {num(v['lines_per_s'], 2)} lines/s",
                  f"{num(v['differs_from_alone'])} lines differ"),
                 ("harvest rate alone over run-batch's", times(result["harvest_vs_run_batch"]), "-")]
    if (c := result.get("co_served")) is not None:
        rows.append((f"beside the conv trace ({num(result['online_requests'])} online requests in {num(result['window_s'])} s)",
                     f"{num(c['wall_s'], 1)} s; online P99 {tails(c['ratios'])} x online-only's",
                     f"{num(c['differs_from_alone'])} lines differ"))
    if (again := result.get("online_only_again")) is not None:
        rows.append(("online-only again, after it (A/A: the host's noise)",
                     f"online P99 {tails(again['ratios'])} x the first run's", "-"))
        if c is not None:
            rows.append(("the co-served run over both online-only runs pooled",
                         f"online P99 {tails(c['ratios_to_both'])}", "-"))
    if (k := result.get("killed")) is not None:
        rows.append(("SIGKILL at {:.0%}, restarted".format(config["kill_at"]),
                     f"{num(k['done_before_kill'])} lines done before; {num(k['lines_computed_twice'])} computed twice; "
                     f"{num(len(k['resumes'] or {}))} generations continued",
                     f"{num(k['differs_from_alone'])} lines differ; the files differ only in "
                     + (", ".join(f"`{f}`" for f in k["fields_that_differ"]) or "nothing") + " (and `created`)"))
    if (sent := result.get("alone_requests")) is not None and sent["num"]:
        rows.append((f"{num(sent['num'])} lines sent alone, one at a time", "-",
                     f"{num(len(sent['differ_from_batch']))} differ"))
    return (md_table(("run", "time and rate", "outputs against the alone run"), rows)
            + f"\n\n{num(result['num_lines'])} chat completions, greedy, {pct(config['long_share'], 0)} "
            f"up to {num(config['long_tokens'])} tokens, the rest up to {num(config['short_tokens'])}; "
            "ratios with 95% bootstrap intervals.")


def house_side_by_side(result: dict, config: dict) -> str:
    b, k, t = result["bench"], result["kv_churn"], result["suite"]

    def row(what: str, show, table: dict) -> tuple[str, ...]:
        return (what, show(table["before"]), show(table["after"]))

    rows = [
        row("`bench` short: conserve SLO attainment (online-only's)",
            lambda r: f"{pct(r['slo_attainment'])} ({pct(r['online_only_slo_attainment'])})", b),
        row("`bench`: conserve P99 TTFT / P99 TBT, x online-only's",
            lambda r: f"{times(r['ttft_p99_ratio'])} / {times(r['tbt_p99_ratio'])}", b),
        row("`bench`: conserve offline tok/s (of the slack)",
            lambda r: f"{num(r['offline_tokens_per_s'], 1)} ({pct(r['offline_tokens_per_s'] / r['slack_tokens_per_s'])})", b),
        row("`kv_churn`: offline tok/s, checkpoints on / off", lambda r: times(r["offline_speedup"]), k),
        row("`kv_churn`: online P99 TTFT / TBT, on / off",
            lambda r: f"{times(r['ttft_p99_ratio'])} / {times(r['tbt_p99_ratio'])}", k),
        row("`kv_churn`: tokens recomputed per resume p50, on (off)",
            lambda r: f"{num(r['recomputed_per_resume_p50_on'])} ({num(r['recomputed_per_resume_p50_off'])})", k),
        row("test suite: passed, wall s", lambda r: f"{num(r['passed'])}{_failed(r)}, {num(r['wall_s'])} s", t),
    ]
    return md_table(("what", config["before"], config["after"]), rows)


def _failed(run: dict) -> str:
    return f" (**{run['failed']} failed**)" if run.get("failed") else ""


def _rate(record: dict, key: str, count, seconds):
    """`record[key]` when the record holds it (a transcribed figure, or None: not known),
    else `count / seconds`."""
    return record[key] if key in record else count / seconds


def nightly_resume(result: dict, config: dict) -> str:
    k, r = result["killed"], result["resumed"]
    paired = result["paired_vs_reference"]
    all_zero = all(v["delta"] == 0 and v["p"] == 1 for v in paired.values())
    rows = [
        ("reference run (`--write-baseline`)", f"{num(result['reference']['wall_s'])} s"),
        ("the nightly, interrupted", f"SIG{k['signal']} at {num(k['at_s'])} s with {k['done']}/{k['total']} "
                                     f"done: exit {k['exit_code']}{_status(k)}"),
        ("the same command again", f"exit {r['exit_code']}{_status(r)} in {num(r['wall_s'])} s"),
        ("jobs holding the run key", str(result["num_jobs_with_the_key"])),
        ("items computed twice", f"{result['num_items_computed_twice']} of {num(result['num_items'])}"),
        ("report rows equal the reference's", yes(result["report_identical"])),
        ("paired with the reference (`--compare-to`)", "Δ = 0, p = 1 on every task" if all_zero else
         "; ".join(f"{t}: Δ {v['delta']}, p {v['p']}" for t, v in paired.items())),
        ("online traffic beside it (reference / rerun)", f"{_online(result['reference'])} / {_online(r)}"),
    ]
    return md_table(("", "measured"), rows)


def _status(run: dict) -> str:
    return f" {run['status']}" if run.get("status") else ""


def _online(run: dict) -> str:
    online = run.get("online") or {}
    if online.get("num_requests") is None:
        return "-"
    return (f"{online['num_requests']} requests ({online['num_completed']} completed), TTFT p99 "
            f"{num(online['ttft_ms']['p99'])} ms")


def partial_generations(result: dict, config: dict) -> str:
    rows = [(way, num(w["generated_before_kill"]), num(w["generated_after"]), num(w["total_generated"]),
             times(w["vs_uninterrupted"], 3), num(w["reprefilled"]), pct(w["store_share"]),
             yes(w["texts_equal_uninterrupted"]))
            for way in ("checkpointed", "restarted", "uninterrupted") for w in [result[way]]]
    return md_table(("run", "tokens before the kill", "after", "in all", "vs uninterrupted", "re-prefilled",
                     "store share of wall time", "texts equal the uninterrupted run's"), rows)


def store_fleet(result: dict, config: dict) -> str:
    from benchmarks.store_fleet import big_line, table

    return "\n\n".join([table(result["sweep"]), *(big_line(r) for r in result["big"])])


def submit_vs_hf(result: dict, config: dict) -> str:
    from benchmarks.submit_vs_hf import markdown_header, markdown_row

    runs = result["runs"]
    if not any("host" in run for run in runs):
        return "\n".join(markdown_header() + [markdown_row(run) for run in runs])
    header, rule = markdown_header()
    return "\n".join([header + " profile --quick ms |", rule + "---|",
                      *(markdown_row(run) + f" {_figures(run.get('host'))} |" for run in runs)])


def _figures(host: dict | None) -> str:
    host = host or {}
    return " / ".join("?" if host.get(k) is None else f"{host[k]:g}"
                      for k in ("fixed_ms", "prefill_tokens_ms", "decodes_ms"))


def vllm_bench_serve(result: dict, config: dict) -> str:
    from benchmarks.vllm_bench_serve import markdown

    return markdown(result["policies"], SimpleNamespace(**config), result.get("pooled")).rstrip("\n")


def faults(result: dict, config: dict) -> str:
    from benchmarks.faults import markdown

    return markdown(result)


# --- records of other commands -----------------------------------------------------------------

def bench(result: dict, config: dict) -> str:
    """`conserve-bench bench`'s report (its `policies`): the tables its own `report.md` has,
    those its data allows (`bench.tables`' rows)."""
    from conserve_bench.bench import tables as t

    report = {"policies": result["policies"], "pooled": result.get("pooled")}  # NOTE: `--rounds` >= 2 only
    parts = [md_table(t.TABLE_COLUMNS, t.table_rows(report))]
    for columns, rows in ((t.GOAL_COLUMNS, t.goal_rows), (t.TAIL_COLUMNS, t.tail_rows),
                          (t.POOLED_COLUMNS, t.pooled_rows),
                          (t.STEP_COLUMNS, t.step_rows), (t.CLASS_COLUMNS, t.class_rows),
                          (t.PREEMPTION_COLUMNS, t.preemption_rows)):
        if found := rows(report):
            parts.append(md_table(columns, found))
    return "\n\n".join(parts)


def demo_phases(result: dict, config: dict) -> str:
    """Where `make demo`'s time goes, per layout of vLLM's processes (its phase lines)."""
    return md_table(("layout", "engine start", "requests built", "evaluation", "`make demo` wall"),
                    [(r["layout"], f"{num(r['engine_start_s'], 1)} s", f"{num(r['requests_built_s'], 1)} s",
                      f"{num(r['evaluation_s'], 1)} s ({num(r['evaluation_items_per_s'], 2)} items/s)",
                      f"{num(r['wall_s'])} s") for r in result["layouts"]])


def status_poll_cost(result: dict, config: dict) -> str:
    quiet = result["modes"]["no polls"]

    def row(mode: str) -> tuple[str, ...]:
        m, polled = result["modes"][mode], mode == "polling"
        return (mode, str(result["num_polls"]) if polled else "0",
                f"{num(result['poll_ms_p50'])}/{num(result['poll_ms_p90'])}" if polled else "-",
                str(m["num_steps"]), "/".join(num(m[f"decode_ms_p{q}"], 1) for q in (50, 90, 99)),
                " / ".join(times(_ratio(m, quiet, f"decode_ms_p{q}")) for q in (90, 99)),
                pct(m["offline_share"], 0))

    table = md_table(("mode", "polls", "poll answered p50/p90 ms", "one-decode steps",
                      "p50/p90/p99 ms", "p90 / p99 x no polls", "offline steps, share of the time"),
                     [row("no polls"), row("polling")])
    return (f"{table}\n\nOne `serve --policy conserve`, a job of {result['job_items']:,} items ({config['tasks']}) "
            f"behind it, vLLM's client at {config['request_rate']:g} req/s in front; `GET /v1/jobs/{{id}}` every "
            f"{config['poll_s']:g} s in {config['phases']} ABBA phases of {config['phase_s']:g} s. Steps: one "
            "online decode and no offline token, from the server's step log.")


def _ratio(mode: dict, base: dict, key: str):
    return None if mode[key] is None or not base[key] else mode[key] / base[key]


RENDERERS = {"gc_pause": gc_pause, "online_step_cost": online_step_cost, "layer_preemption": layer_preemption, "kv_checkpoint": kv_checkpoint, "kv_churn": kv_churn,
             "latency_accuracy": latency_accuracy, "lm_eval_speed": lm_eval_speed, "lm_eval_dropin": lm_eval_dropin,
             "house_side_by_side": house_side_by_side, "score_independence": score_independence,
             "nightly_resume": nightly_resume, "partial_generations": partial_generations,
             "store_fleet": store_fleet, "submit_vs_hf": submit_vs_hf, "vllm_bench_serve": vllm_bench_serve,
             "faults": faults, "bench": bench, "demo_phases": demo_phases, "batch_api": batch_api,
             "status_poll_cost": status_poll_cost}


# --- sharded runs ------------------------------------------------------------------------------

def full_mmlu(folder: Path) -> str:
    """The full-MMLU shards of `submit_vs_hf --shards N`: a row each, then combined."""
    from benchmarks.submit_vs_hf import load_shards, shards_markdown

    paths = sorted(folder.glob("shard-*-of-*.json"))
    [num_shards] = {int(p.stem.rsplit("-of-", 1)[1]) for p in paths}
    num_fewshot = json.loads(paths[0].read_text())["num_fewshot"]
    return "\n".join(shards_markdown(load_shards(folder, num_shards, num_fewshot), num_shards))


FOLDER_RENDERERS = {"full-mmlu": full_mmlu}


# --- the blocks --------------------------------------------------------------------------------

def render(name: str, measured_dir: Path = MEASURED_DIR) -> str:
    """The block of record `name`: its table(s), then where and when it was measured."""
    if (measured_dir / name).is_dir():
        return FOLDER_RENDERERS[name](measured_dir / name)
    record = Measured.read(measured_dir / f"{name}.json")
    return f"{RENDERERS[record.benchmark](record.result, record.config)}\n\n{provenance(record)}"


def provenance(record: Measured) -> str:
    if record.source:
        return f"<sub>{record.source}; {host_line(record.host)}.</sub>"
    return f"<sub>Measured {record.date} on {host_line(record.host)}: `{record.command}`.</sub>"


def regenerate(text: str, measured_dir: Path = MEASURED_DIR) -> str:
    """`text` with every measured block rewritten from its record."""
    return BLOCK.sub(lambda m: f"{m['open']}\n{render(m['name'], measured_dir)}\n\n{m['close']}", text)


def update(paths: list[Path], check: bool, measured_dir: Path = MEASURED_DIR) -> list[Path]:
    """The files whose blocks differ from their records; rewritten unless `check`."""
    stale = []
    for path in paths:
        text = path.read_text()
        fresh = regenerate(text, measured_dir)
        if fresh != text:
            stale.append(path)
            if not check:
                path.write_text(fresh)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="Markdown files [docs/*.md].")
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 if a block is stale.")
    parser.add_argument("--show", metavar="NAME", help="Print the block of one record.")
    parser.add_argument("--measured-dir", type=Path, default=MEASURED_DIR)
    args = parser.parse_args(argv)
    if args.show:
        print(render(args.show, args.measured_dir))
        return 0
    stale = update(args.paths or sorted((REPO / "docs").glob("*.md")), args.check, args.measured_dir)
    for path in stale:
        print(f"{path}: {'differs from' if args.check else 'regenerated from'} benchmarks/measured/")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
