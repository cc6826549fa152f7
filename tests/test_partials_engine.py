"""Partial generations on the real engine: a generation continued from any checkpoint ends with
the text of one uninterrupted greedy run, stop strings across the checkpoint included; and a
SIGKILLed `submit` whose `resume` continues every generation instead of starting it over.

The pure splitting and joining, and the runner on the fake engine, are tests/test_partials.py;
`serve` killed mid-generation is tests/test_server.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conserve_bench.config import JobSpec
from conserve_bench.jobs.lifecycle import run_job, submit_job
from conserve_bench.store import Store, WorkItem

from .conftest import TEST_TASKS, cli_command, wait_for

pytestmark = pytest.mark.engine

LONG_TASK = str(TEST_TASKS / "conserve_tiny_long.yaml")
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


def test_a_generation_continued_from_any_checkpoint_ends_as_an_uninterrupted_one(engine, model_ref):
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
    # the checkpointed tokens are not generated again
    assert engine.num_generated_tokens - before == sum(MAX_TOKENS - cut for cut in cuts.values())

    # A stop string across the checkpoint: it begins in the checkpointed text and ends in the
    # tokens generated after it, where vLLM (which checks only the text it generates) misses it.
    straddling, checkpoints = [], {}
    for w in work:
        cut = 60
        seam = len(decode(tokens[w.key][:cut], skip_special_tokens=True))
        stop = whole[w.key][seam - 3:seam + 3]
        if len(stop) == 6 and whole[w.key].find(stop) == seam - 3:
            key = f"s{len(straddling)}"
            straddling.append(WorkItem(key, "generate_until", [w.args[0], {
                "until": [*UNTIL, stop], "max_gen_toks": MAX_TOKENS}]))
            checkpoints[key] = (tokens[w.key][:cut], whole[w.key][:seam - 3])
    assert len(straddling) >= 2
    uninterrupted, _ = generate(engine, straddling)
    resumed, _ = generate(engine, straddling, {k: ids for k, (ids, _) in checkpoints.items()})
    assert resumed == uninterrupted == {k: text for k, (_, text) in checkpoints.items()}


@pytest.mark.slow
def test_sigkill_mid_generation_then_resume_continues_every_generation(
        tmp_path, session_engine_for_entry_points, capsys):
    """`submit` (its own engine) is SIGKILLed once half the job's tokens are checkpointed;
    `resume` (the session engine) continues each generation from its checkpoint: the texts are
    an uninterrupted run's, and it generates only what the checkpoints did not hold."""
    from conserve_bench import cli

    engine = session_engine_for_entry_points
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    store = Store(url)
    submit = subprocess.Popen(
        cli_command("submit", LONG_TASK, "--db", url, "--output", str(tmp_path),
                    "--checkpoint-tokens", "8", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    total_tokens = 4 * 256
    try:
        def half_generated():
            assert submit.poll() is None, submit.stderr.read()
            jobs = store.list_jobs()
            return jobs[0] if jobs and jobs[0].num_partial_tokens >= total_tokens // 2 else None

        job_id = wait_for(half_generated, "half the tokens checkpointed").id
    finally:
        os.killpg(submit.pid, signal.SIGKILL)  # the CLI and vLLM's engine processes
        submit.wait()
    killed = store.get_job(job_id)
    assert killed.state == "running" and killed.num_done == 0 and killed.num_partial_items == 4
    status = json.loads(subprocess.run(cli_command("status", job_id, "--db", url, "--json"),
                                       capture_output=True, text=True, check=True).stdout)
    assert (status["partial_items"], status["partial_tokens"]) == (4, killed.num_partial_tokens)

    capsys.readouterr()
    cli.app(["resume", job_id, "--db", url, "--output", str(tmp_path), "--json"],
            standalone_mode=False)
    summary = json.loads(capsys.readouterr().out)
    results = json.loads((tmp_path / f"{job_id}.json").read_text())["conserve"]
    assert summary["resumes"]["num_items"] == summary["resumes"]["num_resumes"] == 4
    assert summary["resumes"]["num_reused_tokens"] == killed.num_partial_tokens
    assert results["num_generated_tokens"] == total_tokens - killed.num_partial_tokens
    assert store.get_job(job_id).num_partial_tokens == 0

    clean_store = Store(f"sqlite:///{tmp_path / 'clean.db'}")
    clean = submit_job(clean_store, JobSpec(tasks=(LONG_TASK,)))
    reference = run_job(clean_store, clean.id, engine, output_dir=None)
    assert reference["conserve"]["num_generated_tokens"] == total_tokens
    assert ([i["result"] for i in store.job_items(job_id)]
            == [i["result"] for i in clean_store.job_items(clean.id)])
