"""`ConserveLM`: an lm-eval `LM` whose requests become durable work items.

Each lm-eval request (loglikelihood, loglikelihood_rolling, generate_until) is keyed by a
content hash and attached to a job in the store; only items without a stored result reach
the engine. So an interrupted evaluation, run again, reuses every finished request. The
results are lm-eval's own: `(logprob, is_greedy)`, summed rolling logprobs, generated text.

This class only translates between lm-eval and the runner; it never computes a result itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM

from conserve_bench.requests import item_key
from conserve_bench.runner import Runner
from conserve_bench.store import Store, WorkItem


class ConserveLM(LM):
    """lm-eval backend over the conserve-bench store and engine.

    Built by `conserve-bench submit` with a ready store, engine and job, or by lm-eval from
    `--model_args model=smollm2-135m,db=sqlite:///conserve.db,max_inflight=64`.
    """

    def __init__(self, model: str = "smollm2-135m", db: str | None = None,
                 max_inflight: int = 64, data_dir: str | None = None, **_ignored):
        super().__init__()
        from conserve_bench import jobs

        session = jobs.open_session(model=model, db=db, data_dir=data_dir,
                                    max_inflight=int(max_inflight))
        self._bind(session.store, session.runner, session.job_id, session.engine.fingerprint)

    @classmethod
    def for_job(cls, store: Store, runner: Runner, job_id: str, fingerprint: str,
                on_kind: Callable[[str, int], None] | None = None) -> "ConserveLM":
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._bind(store, runner, job_id, fingerprint, on_kind)
        return lm

    def _bind(self, store, runner, job_id, fingerprint, on_kind=None) -> None:
        self.store, self.runner, self.job_id, self.fingerprint = store, runner, job_id, fingerprint
        self.on_kind = on_kind or (lambda kind, num_items: None)

    # -- lm-eval's three-method contract ------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(float(lp), bool(greedy)) for lp, greedy in self._run("loglikelihood", requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [float(lp) for lp in self._run("loglikelihood_rolling", requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return list(self._run("generate_until", requests))

    def _run(self, kind: str, requests) -> list[Any]:
        args = [_plain(req.args) for req in requests]
        keys = [item_key(kind, a, self.fingerprint) for a in args]
        unique = {k: WorkItem(k, kind, a) for k, a in zip(keys, args)}
        self.store.add_items(self.job_id, list(unique.values()))
        self.on_kind(kind, len(unique))
        results = self.runner.run(self.job_id, list(unique), kind)
        return [results[k] for k in keys]


def _plain(value: Any) -> Any:
    """Request arguments as JSON-stable data (tuples -> lists, keys sorted by json.dumps)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
