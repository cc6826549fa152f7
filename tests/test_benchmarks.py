"""The benchmarks package without running a benchmark: the record each run writes
(`benchmarks.common.write_measured`), the committed records under benchmarks/measured/ (each
renders, each says where it came from), and the docs' measured blocks, which
`python -m benchmarks.tables --check` keeps equal to what the records generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import tables
from benchmarks.common import MEASURED_DIR, Measured, write_measured

BENCHMARKS = Path(tables.__file__).parent
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common", "tables"))

HOST = {"device": "test CPU (2 CPUs)", "fixed_ms": 12.5, "prefill_tokens_ms": 0.5, "decodes_ms": 0.75}
CHURN = {"arms": {arm: {"offline_tokens_per_s": [rate, rate], "offline_tokens_per_s_median": rate,
                        "num_resumes": 3, "loaded_tokens": 1024, "prefix_cached_tokens": 0, "recomputed_tokens": 9,
                        "recomputed_per_resume_p50": 3, "ttft_ms_p50": 100.0, "ttft_ms_p99": 200.0,
                        "tbt_ms_p50": 10.0, "tbt_ms_p99": 20.0, "num_bursts": 4}
                  for arm, rate in (("on", 60.0), ("off", 40.0))},
         "ratios": {"offline_tokens_per_s": 1.5, "per_round": [1.5, 1.5], "ttft_ms_p99": 1.0, "tbt_ms_p99": 1.0},
         "met": True}


def record(tmp_path: Path, name: str = "kv_churn", result: dict = CHURN) -> Path:
    args = argparse.Namespace(pool_gib=2.0, rounds=2, cluster=object(), measured=None, no_profile=False)
    return write_measured(name, result, args, HOST, path=tmp_path / "measured" / f"{name}.json")


def test_a_run_records_where_when_and_how_it_ran(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["kv_churn.py", "--rounds", "2"])
    written = Measured.read(record(tmp_path))
    assert (written.benchmark, written.host, written.result, written.source) == ("kv_churn", HOST, CHURN, None)
    assert written.command == "python -m benchmarks.kv_churn --rounds 2"
    assert written.config == {"pool_gib": 2.0, "rounds": 2}  # no live objects, no output paths
    assert len(written.date) == len("2026-11-28 12:49")


def test_a_run_on_a_stored_profile_records_that_profile_without_measuring_again(tmp_path, monkeypatch):
    """`--no-profile` / `--profile-db`: the servers load the profile the store holds, and the
    record gives its figures; a store without one records an unrecorded host."""
    import subprocess

    from benchmarks.common import host_profile

    from .conftest import store_profile

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("measured a profile"))
    db = f"sqlite:///{tmp_path / 'profile.db'}"
    assert host_profile(db, measure=False) is None
    store_profile(db)
    host = host_profile(db, measure=False)
    assert (host["fixed_ms"], host["prefill_tokens_ms"], host["decodes_ms"]) == (38.9, 2.03, 2.13)


def test_a_record_with_an_unknown_field_is_refused(tmp_path):
    path = record(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "hots": {}}))
    with pytest.raises(ValueError, match="unknown fields hots"):
        Measured.read(path)


def test_check_fails_on_a_typed_table_and_the_rewrite_fixes_only_the_block(tmp_path, capsys):
    record(tmp_path)
    page = tmp_path / "page.md"
    typed = ("# Page\n\nBefore.\n\n<!-- measured:kv_churn -->\n| arm | typed by hand |\n"
             "<!-- /measured:kv_churn -->\n\nAfter.\n")
    page.write_text(typed)
    argv = [str(page), "--measured-dir", str(tmp_path / "measured")]

    assert tables.main([*argv, "--check"]) == 1
    assert page.read_text() == typed and "differs" in capsys.readouterr().out
    assert tables.main(argv) == 0
    fresh = page.read_text()
    assert fresh.startswith("# Page\n\nBefore.\n\n<!-- measured:kv_churn -->\n\n| arm |")
    assert fresh.endswith(".</sub>\n\n<!-- /measured:kv_churn -->\n\nAfter.\n")
    assert "| checkpoints (2 GiB pool) | 60.0 (60.0, 60.0) |" in fresh and "12.5 ms fixed per step" in fresh
    assert tables.main([*argv, "--check"]) == 0

    changed = json.loads((tmp_path / "measured" / "kv_churn.json").read_text())
    changed["result"]["arms"]["on"]["num_bursts"] = 5  # a re-run: the page is stale again
    (tmp_path / "measured" / "kv_churn.json").write_text(json.dumps(changed))
    assert tables.main([*argv, "--check"]) == 1


def test_a_block_naming_no_record_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- measured:nothing -->\n<!-- /measured:nothing -->\n")
    with pytest.raises(FileNotFoundError):
        tables.main([str(page), "--check", "--measured-dir", str(tmp_path)])


@pytest.mark.parametrize("path", sorted(MEASURED_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_committed_record_renders_and_names_its_origin(path):
    written = Measured.read(path)
    block = tables.render(path.stem)
    assert block.count("\n|---") >= 1 and written.benchmark in tables.RENDERERS
    assert written.source or (written.date and written.command and written.host)


def test_the_full_mmlu_shards_render_combined():
    block = tables.render("full-mmlu")
    assert block.count("| shard ") == 16
    assert "| 16 of 16 shards (56,296) | 2,388 | 18,889 (4) | 7.91x |" in block


def test_the_docs_blocks_equal_what_the_records_generate():
    assert tables.main(["--check"]) == 0, "run `python -m benchmarks.tables` and commit the docs"


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_benchmark_runs_as_a_module_of_the_package(name):
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert f"python -m benchmarks.{name}" in source and "sys.path" not in source


def test_a_batch_record_of_some_phases_renders_those_and_the_aa_rows():
    from benchmarks import batch_api

    committed = Measured.read(MEASURED_DIR / "batch_api.json")
    full = committed.result
    ratios = full["co_served"]["ratios"]
    tails_only = {"num_lines": full["num_lines"], "phases": ["online-only", "co-served"], "alone": full["alone"],
                  "window_s": 300.0, "online_requests": 150, "online_only": full["online_only"],
                  "alone_requests": {"num": 0, "differ_from_batch": []},
                  "co_served": {**full["co_served"], "ratios_to_both": ratios},
                  "online_only_again": {"online": full["online_only"], "ratios": ratios}}
    block = tables.RENDERERS["batch_api"](tails_only, committed.config)
    assert "run-batch" not in block and "SIGKILL" not in block and "sent alone" not in block
    assert "A/A" in block and "pooled" in block and "150 online requests" in block
    assert batch_api.phases_arg("online-only, co-served") == ("online-only", "co-served")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown phase alone"):
        batch_api.phases_arg("alone,co-served")


def test_online_step_cost_counts_only_steps_without_an_offline_token():
    from benchmarks.online_step_cost import PROMPT_TOKENS, step_times

    def step(ms: float, prefill: int = 0, decodes: int = 0, offline: int = 0) -> str:
        return json.dumps({"step_s": ms / 1e3, "prefills": [[prefill, 0]] if prefill else [],
                           "decodes": [100] * decodes, "offline_tokens": offline})

    lines = [step(300, prefill=PROMPT_TOKENS), step(30, decodes=1), step(34, decodes=4),
             step(90, decodes=1, offline=1), step(500, prefill=PROMPT_TOKENS, offline=PROMPT_TOKENS),
             step(36, decodes=8), step(40, decodes=2)]
    times = step_times(lines)
    assert times == pytest.approx({"prefill_ms": 300.0, "decode_1_ms": 30.0, "decode_4_8_ms": 35.0})


def test_status_poll_cost_sorts_one_decode_steps_by_the_phase_they_ran_in():
    from benchmarks.status_poll_cost import TRIM_S, by_mode, polling_in

    assert [polling_in(i) for i in range(8)] == [True, False, False, True] * 2  # ABBA
    phases = [{"polling": True, "start": 0.0, "end": 20.0}, {"polling": False, "start": 20.0, "end": 40.0}]

    def step(end_at: float, ms: float, decodes: int = 1, offline: int = 0, prefill: int = 0) -> dict:
        return {"end_at": end_at, "step_s": ms / 1e3, "decodes": [100] * decodes,
                "prefills": [[prefill, 0]] if prefill else [], "offline_tokens": offline}

    steps = [step(5, 80), step(6, 40), step(7, 500, decodes=0, offline=200, prefill=200),
             step(8, 60, decodes=2), step(9, 300, prefill=256, decodes=0),
             step(20 - TRIM_S / 2, 900),  # the poller's switch: left out
             step(25, 30), step(26, 34), step(27, 100, decodes=1, offline=1)]
    modes = by_mode(steps, phases)
    assert modes["polling"]["num_steps"] == 2 and modes["polling"]["decode_ms_p50"] == pytest.approx(60.0)
    assert modes["polling"]["decode_ms_p99"] == pytest.approx(79.6)
    assert modes["polling"]["offline_share"] == pytest.approx(0.5 / (20 - 2 * TRIM_S))
    assert modes["no polls"]["num_steps"] == 2 and modes["no polls"]["offline_share"] == pytest.approx(0.1 / 14)
