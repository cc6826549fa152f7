"""Chat templates (lm-eval's `--apply_chat_template`), rendered as lm-eval's `vllm` backend does.

`ChatTemplate` is all that rendering needs, as plain data: the tokenizer's Jinja template and
its special tokens. A `serve` hands a model's `ChatTemplates` to a client that holds no model
files, and both render with the one `render` here, so a client-mode context is the embedded
one, byte for byte. `load_chat_templates` reads them from a model directory; nothing here
starts an engine.

transformers names relied on: `AutoTokenizer`, `PreTrainedTokenizerBase.chat_template` and
`special_tokens_map`, `utils.chat_template_utils.render_jinja_template` (what the tokenizer's
own `apply_chat_template` renders with).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from conserve_bench.errors import ModelArgsError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE_NAME = "default"  # the entry transformers and lm-eval pick from several


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template: `tokenizer_name` (lm-eval's request-cache name), the Jinja
    `template`, and the special tokens (`bos_token`, ...) it may name."""

    tokenizer_name: str
    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """What results record of the template (and, through the contexts, every item key)."""
        return hashlib.sha256(self.template.encode()).hexdigest()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`messages` as the model's prompt text, as lm-eval's `vllm` and `hf` backends render it.

        NOTE: as theirs, a template that refuses a system turn gets the chat without it.
        """
        import jinja2

        try:
            return self._render(messages, add_generation_prompt)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template failed; rendering the chat without its system turn")
            return self._render([m for m in messages if m["role"] != "system"], add_generation_prompt)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt, **self.special_tokens)
        return rendered[0]



@dataclass(frozen=True)
class ChatTemplates:
    """What a model's tokenizer holds for chat: no template, one, or several by name (`templates`),
    and the special tokens they may name. Plain data: the job API sends it as it is."""

    tokenizer_name: str
    templates: str | dict[str, str] | None
    special_tokens: dict[str, str] = field(default_factory=dict)

    def select(self, name: str | None = None) -> ChatTemplate:
        """The template lm-eval's `LM.chat_template(name)` selects (the one there is, or of
        several the one `name`d, None: `default`); ModelArgsError if there is none."""
        return ChatTemplate(self.tokenizer_name, select_template(self.templates, name),
                            self.special_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatTemplates":
        return cls(d["tokenizer_name"], d.get("templates"), dict(d.get("special_tokens") or {}))


def select_template(templates: str | dict[str, str] | None, name: str | None = None) -> str:
    if templates is None:
        raise ModelArgsError("the model's tokenizer has no chat template; drop --apply_chat_template")
    if isinstance(templates, str):
        return templates
    chosen = name or DEFAULT_TEMPLATE_NAME
    if chosen not in templates:
        raise ModelArgsError(f"no chat template named {chosen!r}; the tokenizer has "
                             f"{', '.join(sorted(templates))}")
    return templates[chosen]


def tokenizer_name(model_name: str) -> str:
    """lm-eval's `tokenizer_name` of a model: its name with `/` as `__`."""
    return model_name.replace("/", "__")


def load_chat_templates(model_path: str, model_name: str, revision: str | None = None) -> ChatTemplates:
    """The chat templates of the model at `model_path` (a hub id: at `revision`), named
    `model_name` in results."""
    templates, tokens = _tokenizer_chat(model_path, revision)
    return ChatTemplates(tokenizer_name(model_name), templates, dict(tokens))


@functools.lru_cache(maxsize=4)
def _tokenizer_chat(model_path: str, revision: str | None) -> tuple[Any, tuple[tuple[str, str], ...]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    tokens = tuple(sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)))
    return tokenizer.chat_template, tokens
