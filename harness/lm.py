"""`ConserveLM`: an lm-eval `LM` whose requests become durable work items.

Each lm-eval request (loglikelihood, loglikelihood_rolling, generate_until) is keyed by a
content hash and attached to a job in the store; only items without a stored result reach
the engine. So an interrupted evaluation, run again, reuses every finished request. The
results are lm-eval's own: `(logprob, is_greedy)`, summed rolling logprobs, generated text.

Two modes: embedded (the model runs in this process, like `submit`) and client
(`base_url=...`: the requests become jobs on a running `conserve-bench serve`). This class
only translates between lm-eval and a backend (`backends.py`); it never computes a result.

NOTE: an `LM`, not a `TemplateLM`: the work-item key is the request's text, and tokenization
(lm-eval's exact context/continuation split) happens next to the engine, in
`conserve_bench.engine.prompts`; a client-mode process holds no tokenizer at all.
"""

from __future__ import annotations

import atexit
import difflib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM

from conserve_bench.config import DEFAULT_MODEL, DEFAULT_PARTIAL_S, DEFAULT_PARTIAL_TOKENS, RunConfig
from conserve_bench.errors import ModelArgsError
from conserve_bench.jobs.runner import Runner
from conserve_bench.store import Store

# lm-eval's own options, which `create_from_arg_string` hands every backend; this one batches
# by itself (`max_inflight`) and runs where its engine runs, so it accepts and ignores them.
LM_EVAL_OPTIONS = ("batch_size", "max_batch_size", "device")

from .backends import LocalBackend, RemoteBackend


class ConserveLM(LM):
    """lm-eval backend over the conserve-bench store and engine.

    From lm-eval: `--model conserve --model_args model=smollm2-135m,db=sqlite:///conserve.db`
    (embedded) or `--model_args base_url=http://127.0.0.1:8000,api_key=KEY` (client).
    From Python:

        >>> with ConserveLM(model="smollm2-135m", db="sqlite:///conserve.db") as lm:
        ...     simple_evaluate(model=lm, tasks=["mmlu_local_anatomy"], limit=10)
    """

    def __init__(self, model: str = DEFAULT_MODEL, db: str | None = None,
                 max_inflight: int = 64, data_dir: str | None = None,
                 partial_tokens: int = DEFAULT_PARTIAL_TOKENS,
                 partial_s: float = DEFAULT_PARTIAL_S,
                 base_url: str | None = None, api_key: str | None = None,
                 engine: Any = None, progress: bool = True, **lm_eval_options: Any):
        super().__init__()
        _check_options(lm_eval_options)
        self.session, self.report = None, True
        if base_url:
            from conserve_bench.serve.client import JobClient

            self.backend = RemoteBackend(JobClient(base_url, api_key), show_progress=progress)
            return
        from .session import open_session

        try:
            run_cfg = RunConfig(max_inflight=int(max_inflight), partial_s=float(partial_s),
                                partial_tokens=int(partial_tokens))
        except ValueError as e:
            raise ModelArgsError(str(e)) from None
        self.session = open_session(model=model, db=db, data_dir=data_dir, run_cfg=run_cfg,
                                    engine=engine)
        self.backend = LocalBackend(self.session.store, self.session.runner, self.session.job_id,
                                    self.session.engine.fingerprint, show_progress=progress)
        # NOTE: lm-eval's CLI never closes its model; without this vLLM's engine core, where
        # it runs in a process of its own, outlives the evaluation and the interpreter waits on it.
        atexit.register(self.close)

    @classmethod
    def for_job(cls, store: Store, runner: Runner, job_id: str, fingerprint: str,
                on_kind: Callable[[str, int], None] | None = None) -> "ConserveLM":
        """The LM `submit` uses: a ready store, runner and job; progress is the caller's."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm.session, lm.report = None, False
        lm.backend = LocalBackend(store, runner, job_id, fingerprint, on_kind)
        return lm

    @property
    def job_id(self) -> str | None:
        return self.session.job_id if self.session else None

    def close(self) -> None:
        """Finish this run's job and stop the engine it started (embedded mode only)."""
        if self.session is not None:
            self.session.close()

    def __enter__(self) -> "ConserveLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lm-eval's three-method contract ------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(float(lp), bool(greedy)) for lp, greedy in self._run("loglikelihood", requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [float(lp) for lp in self._run("loglikelihood_rolling", requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return list(self._run("generate_until", requests))

    def _run(self, kind: str, requests) -> list[Any]:
        results, counts = self.backend.run(kind, [_plain(req.args) for req in requests])
        if self.report:
            sys.stderr.write(counts.describe() + "\n")
        return results


def _check_options(options: dict[str, Any]) -> None:
    """Refuse model_args this backend does not know, naming the closest known one."""
    unknown = sorted(set(options) - set(LM_EVAL_OPTIONS))
    if not unknown:
        return
    known = [name for name in inspect.signature(ConserveLM.__init__).parameters
             if name not in ("self", "engine", "lm_eval_options")]
    hints = [f"{name!r}" + (f" (did you mean {close[0]!r}?)"
                            if (close := difflib.get_close_matches(name, known, n=1)) else "")
             for name in unknown]
    raise ModelArgsError(f"unknown --model_args for conserve: {', '.join(hints)}; "
                         f"known: {', '.join(known)}")


def _plain(value: Any) -> Any:
    """Request arguments as JSON-stable data (tuples -> lists, keys sorted by json.dumps)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
