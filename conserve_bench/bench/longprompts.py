"""Synthetic long-prompt generations for `bench`: an lm-eval task that fills the KV cache.

Writes a `generate_until` task (YAML + JSON lines) into the phase folder; the server runs it
as an ordinary offline job. Prompts are seeded random words, about one token each, so the
prompt lengths are approximate; generation runs to `max_gen_toks` unless the model emits EOS.
It never submits anything itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at",
         "from", "his", "her", "they", "this", "that", "which", "one", "all", "time", "year",
         "people", "water", "world", "house", "light", "music", "city", "river", "stone", "paper")
NEVER = "<conserve-bench: no stop string>"


def write_long_prompt_task(folder: Path, num_prompts: int, prompt_tokens: int,
                           generated_tokens: int, seed: int) -> Path:
    """Write the task and its data under `folder`; returns the YAML path to submit."""
    rng = random.Random(seed)
    data = folder / "long_prompts.jsonl"
    with data.open("w") as f:
        for _ in range(num_prompts):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(prompt_tokens))}) + "\n")
    task = folder / "long_prompts.yaml"
    task.write_text("\n".join([
        f"task: conserve_bench_long_prompts_{seed}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data.resolve()))}}}}}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{text}}"',
        'doc_to_target: ""',
        f"generation_kwargs: {{until: [{json.dumps(NEVER)}], max_gen_toks: {generated_tokens}, do_sample: false}}",
        "metric_list: [{metric: exact_match}]",
        "metadata: {version: 1.0}",
        "",
    ]))
    return task.resolve()
