"""Provenance in the item key: the engine fingerprint names the weights (`weights_identity`),
vLLM's version and device, and the BOS prefix, so that new weights under the same name, another
hub revision or another vLLM never reuse old scores; results say which weights made them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conserve_bench.config import EngineConfig, JobSpec, fingerprint_fields, is_legacy_fingerprint
from conserve_bench.engine import models
from conserve_bench.engine.models import NUM_SAMPLES, SAMPLE_BYTES, weights_identity

from .conftest import DATA_DIR, MODEL, cli

WEIGHTS_BYTES = 3 * 2**20  # larger than a file read whole: sampled


def model_folder(root: Path) -> Path:
    """A model directory of the files the identity reads, with a sampled weight file."""
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * (WEIGHTS_BYTES // 256))
    return folder


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_same_files_give_the_same_identity(tmp_path):
    folder = model_folder(tmp_path)
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert weights_identity(str(folder)) == weights_identity(str(copy))
    assert len(weights_identity(str(folder))) == 12


@pytest.mark.parametrize("name, offset", [
    ("model.safetensors", 100),  # the first sampled block
    ("model.safetensors", round(8 * (WEIGHTS_BYTES - SAMPLE_BYTES) / (NUM_SAMPLES - 1)) + 10),  # the 9th
    ("model.safetensors", WEIGHTS_BYTES - 1),  # the last byte
    ("config.json", 2),
    ("tokenizer_config.json", 5),  # the chat template lives here
])
def test_one_byte_changed_changes_the_identity(tmp_path, name, offset):
    folder = model_folder(tmp_path)
    before = weights_identity(str(folder))
    flip_byte(folder / name, offset)
    assert weights_identity(str(folder)) != before


def test_a_weight_file_added_or_renamed_changes_the_identity(tmp_path):
    folder = model_folder(tmp_path)
    before = weights_identity(str(folder))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    renamed = weights_identity(str(folder))
    (folder / "model.safetensors.index.json").write_text("{}")
    assert len({before, renamed, weights_identity(str(folder))}) == 3


def test_the_identity_reads_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    """A 14 GB weight file costs NUM_SAMPLES blocks, not 14 GB (a sparse file here)."""
    folder = model_folder(tmp_path)
    with open(folder / "model-00002-of-00002.safetensors", "wb") as f:
        f.truncate(14 * 10**9)
    num_read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            num_read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(models, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    weights_identity(str(folder))
    small_files = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".json")
    assert sum(num_read) <= small_files + 2 * NUM_SAMPLES * SAMPLE_BYTES  # two sampled weight files
    assert sum(num_read) >= 2 * NUM_SAMPLES * SAMPLE_BYTES  # and every block was read


def test_a_hub_model_is_named_by_its_downloaded_commit_else_its_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights_identity("org/name") == "rev-main"
    assert weights_identity("org/name", "v2.0") == "rev-v2.0"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert weights_identity("org/name") == f"rev-{commit[:12]}"


# -- the fingerprint ----------------------------------------------------------------------------


def test_the_fingerprint_names_weights_vllm_and_the_bos_prefix_readably():
    cfg = EngineConfig(model_path="/m", model_name="smollm2-135m")
    fingerprint = cfg.fingerprint(8192, "1a2b3c4d5e6f", "0.32.0+cpu")
    assert fingerprint == "smollm2-135m|float32|8192|w=1a2b3c4d5e6f|vllm=0.32.0+cpu"
    assert fingerprint_fields(fingerprint) == {"weights": "1a2b3c4d5e6f", "vllm": "0.32.0+cpu"}
    with_bos = EngineConfig(model_path="/m", model_name="m", add_bos_token=True)
    assert with_bos.fingerprint(8192, "w", "v").endswith("|bos")
    assert cfg.fingerprint(8192, "w", "v", dtype="bfloat16").startswith("smollm2-135m|bfloat16|")


def test_an_engines_fingerprint_is_taken_where_submit_and_serve_both_take_it(tmp_path):
    """`engine_fingerprint`: the model folder's identity and this vLLM's runtime."""
    import vllm
    from vllm.platforms import current_platform

    from conserve_bench.engine.local import engine_config, engine_fingerprint
    from conserve_bench.engine.models import ModelRef

    folder = model_folder(tmp_path)
    cfg = engine_config(ModelRef("mine", str(folder)))
    fields = fingerprint_fields(engine_fingerprint(cfg, 2048))
    assert fields == {"weights": weights_identity(str(folder)),
                      "vllm": f"{vllm.__version__}+{current_platform.device_type}"}


def test_a_job_of_requests_keyed_by_an_old_fingerprint_says_so_in_one_line(store):
    from conserve_bench.errors import ForeignJobError
    from conserve_bench.jobs.lifecycle import check_runs_on

    assert is_legacy_fingerprint("smollm2-135m|float32|8192")
    old = store.create_job(JobSpec(tasks=("lm-eval",), source="requests",
                                   fingerprint="smollm2-135m|float32|8192"))
    with pytest.raises(ForeignJobError) as refused:
        check_runs_on(old, "smollm2-135m|float32|8192|w=1a2b3c4d5e6f|vllm=0.32.0+cpu")
    message = str(refused.value)
    assert "\n" not in message and "older conserve-bench" in message and old.id in message
    session = store.create_job(JobSpec(tasks=("lm-eval",), source="session",
                                       fingerprint="smollm2-135m|float32|8192"))
    with pytest.raises(ForeignJobError, match="computed again"):
        check_runs_on(session)


def test_results_name_the_weights_and_vllm_of_every_score(store):
    from conserve_bench.engine.fake import FakeEngine
    from conserve_bench.jobs.lifecycle import run_job, submit_requests

    engine = FakeEngine(fingerprint="m|float32|2048|w=1a2b3c4d5e6f|vllm=0.32.0+cpu")
    job, _ = submit_requests(store, [("loglikelihood_rolling", ["x"])], engine.fingerprint, "m")
    results = run_job(store, job.id, engine, output_dir=None)
    assert results["conserve"]["engine"] == {
        "name": "vllm", "fingerprint": engine.fingerprint, "weights": "1a2b3c4d5e6f",
        "vllm": "0.32.0+cpu"}


# -- end to end: new weights under the same name are computed again ------------------------------


def submit_once(model_dir: Path, db: str, output: Path) -> dict:
    """`submit` one document of one MMLU subject on the model folder; its results file."""
    done = cli("submit", "mmlu_anatomy", "--model", str(model_dir), "--limit", "1",
               "--data-dir", str(DATA_DIR), "--db", db, "--output", str(output), "--json",
               timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    newest = max(output.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())


def nudge_embeddings(model_dir: Path) -> None:
    """Rewrite the largest tensor slightly, as a fine-tune would: the same name, new weights."""
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 1.01
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.slow
@pytest.mark.engine
def test_a_store_reused_after_new_weights_recomputes_every_item(tmp_path):
    """Two `submit`s, each starting an engine: the weights nudged in between. (That unchanged
    weights reuse is the identity's stability, tested above on a copy of a folder, and every
    rerun test's reuse.)"""
    from conserve_bench.engine.models import resolve_model

    model_dir = Path(shutil.copytree(resolve_model(MODEL).path, tmp_path / "smollm2-copy"))
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = submit_once(model_dir, db, tmp_path / "first")["conserve"]
    assert first["num_items_computed"] == first["num_items"] > 0
    assert first["engine"]["weights"] == weights_identity(str(model_dir))

    nudge_embeddings(model_dir)
    second = submit_once(model_dir, db, tmp_path / "second")["conserve"]
    assert second["engine"]["weights"] != first["engine"]["weights"]
    assert second["engine"]["weights"] == weights_identity(str(model_dir))  # what the next run computes
    assert second["num_items_computed"] == second["num_items"] == first["num_items"]
