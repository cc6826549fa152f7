"""Mutants the suite must kill: one wrong line each in the runner, the store, the scheduler and
the batches.

Each mutant is applied to a copy of the checkout (never to this one) and the tests named for
it run there; a mutant they do not fail is a gap in the suite. Not collected by pytest (no
`test_` prefix): run `python -m tests.mutants` (about a minute on 2 cores).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv", ".git", "results", "*.db", "__pycache__", ".hypothesis")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    line: str  # the line as it stands (exactly once in the file)
    mutated: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail on it


MUTANTS = (
    Mutant("runner: uncommitted results stop counting against the in-flight window",
           "conserve_bench/jobs/runner.py",
           "room = self.cfg.max_inflight - len(self._attempts)",
           "room = self.cfg.max_inflight - self.engine.num_pending_items",
           ("tests/test_runner.py",)),
    Mutant("store: a commit no longer checks the attempt it was claimed under (the fence)",
           "conserve_bench/store/leases.py",
           "return items.update().where(held(owner, fenced)).values(\n        state=ItemState.DONE.value",
           "return items.update().where(held(owner, False)).values(\n        state=ItemState.DONE.value",
           ("tests/test_store.py", "tests/test_leases.py")),
    Mutant("scheduler: offline work sized against twice the step's budget",
           "conserve_bench/sched/policy.py",
           "else step.fit(request, budget_s, least[request.decode, request.prompt_logprobs]))",
           "else step.fit(request, 2 * budget_s, least[request.decode, request.prompt_logprobs]))",
           ("tests/test_policy.py", "tests/test_scheduler.py")),
    Mutant("scheduler: running offline decodes crowd out the throughput-sized prefill chunk",
           "conserve_bench/sched/policy.py",
           "budget_s += _decodes_cost(offline, model)",
           "budget_s += 0.0",
           ("tests/test_policy.py",)),
    Mutant("scheduler: offline-only steps keep their length however often online arrivals cut them",
           "conserve_bench/sched/policy.py",
           "return offline_step_for(self.offline_step_s, model.predict(StepShape()), self.arrival_rate,",
           "return offline_step_for(self.offline_step_s, model.predict(StepShape()), None,",
           ("tests/test_preemption.py",)),
    Mutant("scheduler: arrivals while online work runs count as cutting offline-only steps",
           "conserve_bench/vllm_plugin/scheduler.py",
           "self._arrivals.online_work(bool(online), now)",
           "self._arrivals.online_work(False, now)",
           ("tests/test_scheduler.py",)),
    Mutant("layer preemption: an arrival cuts a step however little of it is left",
           "conserve_bench/vllm_plugin/safepoints.py",
           "if arrived and not forced and self._runs_out(meta, now):",
           "if False:",
           ("tests/test_preemption.py",)),
    Mutant("latency model: a batch of prefill chunks and decodes costs no more than its tokens",
           "conserve_bench/sched/latency.py",
           "float(num_prefill_tokens > 0 and num_decodes > 0))",
           "0.0)",
           ("tests/test_latency.py",)),
    Mutant("size corrections: a class's budget inversion runs past the class's largest size",
           "conserve_bench/sched/sizes.py",
           "most = max_added if high is None else min(max_added, high - num_before)",
           "most = max_added",
           ("tests/test_sizes.py",)),
    Mutant("size corrections: kept as measured against the model before a refit",
           "conserve_bench/sched/refit.py",
           "        if model is not self._base:\n            self._measure_against(model)\n        for name in self._stale:",
           "        for name in self._stale:",
           ("tests/test_sizes.py",)),
    Mutant("run-outs: the plan is trusted however slowly the step runs",
           "conserve_bench/vllm_plugin/safepoints.py",
           "return left_s <= meta.run_out_wait_s",
           "return True",
           ("tests/test_preemption.py",)),
    Mutant("tail margins: a prior, and a kind's factor, never age out",
           "conserve_bench/sched/refit.py",
           "return getattr(self.prior, kind) if self._num_steps <= self.max_age else 1.0",
           "return getattr(self.prior, kind)",
           ("tests/test_refit.py", "tests/test_scheduler.py")),
    Mutant("scheduler: every waiting request is priced, past the step's tokens too",
           "conserve_bench/sched/policy.py",
           "while num_tokens < max_num_tokens and (request := next(requests, None)) is not None:",
           "while (request := next(requests, None)) is not None:",
           ("tests/test_policy.py", "tests/test_scheduler.py")),
    Mutant("size corrections: work added to a step priced below the step's own correction",
           "conserve_bench/sched/sizes.py",
           "return self._correction(name) if name is not None else 0.0",
           "return 0.0",
           ("tests/test_sizes.py",)),
    Mutant("batches: usage counts every token of a response as input",
           "conserve_bench/batches/objects.py",
           'num_in += usage.get("prompt_tokens") or 0',
           'num_in += usage.get("total_tokens") or 0',
           ("tests/test_batches.py",)),
)


def killed(mutant: Mutant) -> tuple[bool, str]:
    """Applies `mutant` to a fresh copy of the checkout and runs its tests there: (failed, the
    first failing test or pytest's last line)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=IGNORE)
        target = copy / mutant.path
        source = target.read_text()
        if source.count(mutant.line) != 1:
            raise SystemExit(f"{mutant.path}: the line to mutate is not there once: {mutant.line!r}")
        target.write_text(source.replace(mutant.line, mutant.mutated))
        # NOTE: run from the copy, whose conserve_bench comes first on sys.path
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider",
                              "-m", "not engine", *mutant.tests], cwd=copy, capture_output=True,
                             text=True)
        where = subprocess.run([sys.executable, "-c", "import conserve_bench; print(conserve_bench.__file__)"],
                               cwd=copy, capture_output=True, text=True).stdout
        assert where.startswith(str(copy)), f"the copy's package was not the one tested: {where}"
        lines = out.stdout.strip().splitlines() or [""]
        return out.returncode == 1, next((line for line in lines if line.startswith("FAILED")), lines[-1])


def main() -> int:
    survivors = 0
    for mutant in MUTANTS:
        failed, last = killed(mutant)
        survivors += not failed
        print(f"{'killed  ' if failed else 'SURVIVED'} {mutant.name}: {last}", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
