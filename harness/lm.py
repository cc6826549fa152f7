"""`ConserveLM`: an lm-eval `LM` whose requests become durable work items.

Each lm-eval request (loglikelihood, loglikelihood_rolling, generate_until) is keyed by a
content hash and attached to a job in the store; only items without a stored result reach
the engine. So an interrupted evaluation, run again, reuses every finished request. The
results are lm-eval's own: `(logprob, is_greedy)`, summed rolling logprobs, generated text.

Two modes: embedded (the model runs in this process, like `submit`) and client
(`base_url=...`: the requests become jobs on a running `conserve-bench serve`). This class
only translates between lm-eval and a backend (`backends.py`); it never computes a result.
It takes what a user of lm-eval's `vllm` backend types (`pretrained=`, `dtype=`,
`max_model_len=`, ...: `modelargs.py`), and renders chat templates (`--apply_chat_template`)
with the served model's tokenizer template (`engine.chat`), fetched from the server in client
mode, so both modes build the same contexts and so the same item keys.

NOTE: an `LM`, not a `TemplateLM`: the work-item key is the request's text, and tokenization
(lm-eval's exact context/continuation split) happens next to the engine, in
`conserve_bench.engine.prompts`; a client-mode process holds no tokenizer at all.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM

from conserve_bench.config import DEFAULT_MODEL, DEFAULT_PARTIAL_S, DEFAULT_PARTIAL_TOKENS, RunConfig
from conserve_bench.engine.chat import ChatTemplate, ChatTemplates, load_chat_templates
from conserve_bench.errors import ModelArgsError
from conserve_bench.jobs.runner import Runner
from conserve_bench.store import Store

from .backends import LocalBackend, RemoteBackend
from .modelargs import ModelArgs, check_served, known_names, parse_model_args

log = logging.getLogger(__name__)

# NOTE: lm-eval's names for the tokens to generate (`models.utils.normalize_gen_kwargs`): a
# request naming any of them keeps its own, as with lm-eval's `vllm` backend.
MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


class ConserveLM(LM):
    """lm-eval backend over the conserve-bench store and engine.

    From lm-eval: `--model conserve --model_args model=smollm2-135m,db=sqlite:///conserve.db`
    (embedded) or `--model_args base_url=http://127.0.0.1:8000,api_key=KEY` (client).
    From Python:

        >>> with ConserveLM(model="smollm2-135m", db="sqlite:///conserve.db") as lm:
        ...     simple_evaluate(model=lm, tasks=["mmlu_local_anatomy"], limit=10)
    """

    def __init__(self, model: str | None = None, db: str | None = None,
                 max_inflight: int = 64, data_dir: str | None = None,
                 partial_tokens: int = DEFAULT_PARTIAL_TOKENS,
                 partial_s: float = DEFAULT_PARTIAL_S,
                 base_url: str | None = None, api_key: str | None = None,
                 pretrained: str | None = None, max_gen_toks: int | None = None,
                 engine: Any = None, progress: bool = True, **model_args: Any):
        super().__init__()
        named = _model(model, pretrained)
        self.model = named or DEFAULT_MODEL
        parsed = parse_model_args(model_args, self.model, known_names(_own_options()))
        self.max_gen_toks = _max_gen_toks(max_gen_toks)
        self.session, self.report = None, True
        self._templates = self._rendering = None
        if base_url:
            self._start_client(base_url, api_key, progress, named, parsed)
            return
        from .session import open_session

        try:
            run_cfg = RunConfig(max_inflight=int(max_inflight), partial_s=float(partial_s),
                                partial_tokens=int(partial_tokens))
        except ValueError as e:
            raise ModelArgsError(str(e)) from None
        self.session = open_session(model=self.model, db=db, data_dir=data_dir, run_cfg=run_cfg,
                                    engine=engine, **_session_options(parsed))
        self.backend = LocalBackend(self.session.store, self.session.runner, self.session.job_id,
                                    self.session.engine.fingerprint, show_progress=progress)
        self._chat_source = functools.partial(local_chat_templates, self.session.engine, self.model)
        # NOTE: lm-eval's CLI never closes its model; without this vLLM's engine core, where
        # it runs in a process of its own, outlives the evaluation and the interpreter waits on it.
        atexit.register(self.close)

    def _start_client(self, base_url: str, api_key: str | None, progress: bool,
                      model: str | None, parsed: ModelArgs) -> None:
        """Client mode: a running server's engine computes; options that would configure an
        engine must be what it runs already (asked only when some are given)."""
        from conserve_bench.serve.client import JobClient

        client = JobClient(base_url, api_key)
        if model is not None or parsed.engine:
            check_served(parsed.engine, model, client.served_model())
        self.backend = RemoteBackend(client, show_progress=progress)
        self._chat_source = lambda: ChatTemplates.from_dict(client.chat_templates())

    @classmethod
    def for_job(cls, store: Store, runner: Runner, job_id: str, fingerprint: str,
                on_kind: Callable[[str, int], None] | None = None,
                engine: Any = None, model: str = DEFAULT_MODEL) -> "ConserveLM":
        """The LM `submit` uses: a ready store, runner and job; progress is the caller's.
        `engine` and `model`: where a chat template comes from (`local_chat_templates`)."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm.session, lm.report, lm.max_gen_toks, lm.model = None, False, None, model
        lm._templates = lm._rendering = None
        lm.backend = LocalBackend(store, runner, job_id, fingerprint, on_kind)
        lm._chat_source = functools.partial(local_chat_templates, engine, model)
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
        args = [_plain(req.args) for req in requests]
        if kind == "generate_until" and self.max_gen_toks is not None:
            args = [[context, _with_max_gen_toks(gen_kwargs, self.max_gen_toks)]
                    for context, gen_kwargs in args]
        results, counts = self.backend.run(kind, args)
        if self.report:
            sys.stderr.write(counts.describe() + "\n")
        return results

    # -- chat templates (lm-eval's --apply_chat_template) ---------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat as the model's prompt, rendered as lm-eval's `vllm` backend renders it: with
        the tokenizer's template (of several, its `default`)."""
        return self._template().render(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self._template().tokenizer_name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template `--apply_chat_template [NAME]` selects (lm-eval records it).

        NOTE: lm-eval renders with the default template whatever NAME says; a NAME that
        selects another one is refused rather than recorded for text it did not render.
        """
        if chat_template is False or chat_template is None:
            return None
        name = chat_template if isinstance(chat_template, str) else None
        chosen = self._chat_templates().select(name)
        if chosen.template != self._template().template:
            raise ModelArgsError(f"chat template {name!r} is not the tokenizer's default, which "
                                 "lm-eval renders with; use --apply_chat_template without a name")
        return chosen.template

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval adds to its results' `config`: the chat template, where one rendered."""
        if self._rendering is None:
            return {}
        return {"chat_template_sha256": self._rendering.sha256,
                "tokenizer_name": self._rendering.tokenizer_name}

    def _chat_templates(self) -> ChatTemplates:
        if self._templates is None:
            self._templates = self._chat_source()
        return self._templates

    def _template(self) -> ChatTemplate:
        """The template lm-eval renders with; from now on, recorded with the results."""
        if self._rendering is None:
            self._rendering = self._chat_templates().select()
            if isinstance(self.backend, RemoteBackend):
                self.backend.chat_template_sha256 = self._rendering.sha256
        return self._rendering


def local_chat_templates(engine: Any, model: str) -> ChatTemplates:
    """The chat templates of the model an engine in this process loaded (`engine.cfg`, where
    it has one: vLLM's), else of `model` (a fake engine's, a server's pump)."""
    from conserve_bench.engine.models import resolve_model

    cfg = getattr(engine, "cfg", None)
    if cfg is not None and getattr(cfg, "model_path", None):
        return load_chat_templates(cfg.model_path, cfg.model_name, getattr(cfg, "revision", None))
    ref = resolve_model(model)
    return load_chat_templates(ref.path, ref.name)


def _own_options() -> list[str]:
    return [name for name in inspect.signature(ConserveLM.__init__).parameters
            if name not in ("self", "engine", "progress", "model_args")]


def _model(model: str | None, pretrained: str | None) -> str | None:
    """The model named, by `model` or lm-eval `vllm`'s `pretrained` (the same one, if both)."""
    if model is not None and pretrained is not None:
        from conserve_bench.engine.models import model_name

        if model_name(str(model)) != model_name(str(pretrained)):
            raise ModelArgsError(f"model_args model={model!r} and pretrained={pretrained!r} "
                                 "name different models; give one")
    named = pretrained if pretrained is not None else model
    return None if named is None else str(named)


def _max_gen_toks(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelArgsError(f"model_args max_gen_toks must be a whole number >= 1, got {value!r}")
    return value


def _with_max_gen_toks(gen_kwargs: dict[str, Any], max_gen_toks: int) -> dict[str, Any]:
    """`gen_kwargs` with the backend's default length, unless it names one of its own."""
    if any(key in gen_kwargs for key in MAX_TOKENS_KEYS):
        return gen_kwargs
    return {**gen_kwargs, "max_gen_toks": max_gen_toks}


def _session_options(parsed: ModelArgs) -> dict[str, Any]:
    """The engine options given, as `open_session` takes them (`config.ModelOptions`)."""
    given = {name: value for name, value in parsed.engine.items() if value is not None}
    if not given:
        return {}
    from conserve_bench.config import ModelOptions

    try:
        return {"options": ModelOptions(**given)}
    except (TypeError, ValueError) as e:
        raise ModelArgsError(f"model_args: {e}") from None


def _plain(value: Any) -> Any:
    """Request arguments as JSON-stable data (tuples -> lists, keys sorted by json.dumps)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
