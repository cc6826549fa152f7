"""Chat templates: lm-eval's `--apply_chat_template`, `--fewshot_as_multiturn`,
`--system_instruction` through `--model conserve`, `submit`, `ci` configs and the job API.

The contexts carry the default model's template markers (SmolLM2: `<|im_start|>role`), the
template's hash is recorded with the results, and a client-mode run renders exactly what an
embedded run renders (both as the tokenizer's own `apply_chat_template`), its template fetched
from the server's job API. On the fake engine: rendering and wiring are what is tested.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

from conserve_bench.config import JobSpec
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.errors import ModelArgsError
from conserve_bench.harness.lm import ConserveLM
from conserve_bench.store import Store

from .conftest import MODEL, TEST_TASKS

SYSTEM = "Answer in one word."
SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
ASSISTANT = "<|im_start|>assistant\n"
CHATS = [
    [{"role": "user", "content": "Question: 2+2?\nAnswer:"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": " A1"}, {"role": "user", "content": "Q2"}],
]


@functools.cache
def tiny_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TEST_TASKS), include_defaults=False)


@pytest.fixture(scope="module")
def tokenizer(model_ref):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_ref.path)


def contexts(store: Store, job_id: str) -> list[str]:
    return [item["args"][0] for item in store.job_items(job_id, with_args=True)]


def test_simple_evaluate_applies_the_models_chat_template(tmp_path, tokenizer):
    """`simple_evaluate(model=ConserveLM(...), apply_chat_template=True, ...)`: every context
    is the chat lm-eval built, rendered with the model's template; the results name it."""
    from lm_eval import simple_evaluate

    url = f"sqlite:///{tmp_path / 'chat.db'}"
    with ConserveLM(db=url, engine=FakeEngine(), progress=False) as lm:
        output = simple_evaluate(model=lm, tasks=["conserve_tiny_gen"], limit=3, num_fewshot=2,
                                 task_manager=tiny_tasks(), apply_chat_template=True,
                                 fewshot_as_multiturn=True, system_instruction=SYSTEM)
    found = contexts(Store(url), lm.job_id)
    assert len(found) == 3 and all(c.startswith(SYSTEM_TURN) and c.endswith(ASSISTANT) for c in found)
    assert all(c.count("<|im_start|>user\n") == 3 and c.count(ASSISTANT) == 3 for c in found)
    assert lm.tokenizer_name == MODEL
    sha256 = lm.get_model_info()["chat_template_sha256"]
    assert output["config"]["chat_template_sha256"] == sha256
    import hashlib

    assert sha256 == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()


def test_a_task_job_passes_its_chat_options_to_lm_eval(store, tmp_path):
    """`submit --apply-chat-template --system-instruction ...`: the job's spec reaches
    `simple_evaluate`; its results record the template's hash."""
    from conserve_bench.jobs import lifecycle

    spec = JobSpec(tasks=("conserve_tiny_gen",), limit=2, num_fewshot=1, apply_chat_template=True,
                   system_instruction=SYSTEM)
    job = lifecycle.submit_job(store, spec, include_paths=(str(TEST_TASKS),))
    results = lifecycle.run_job(store, job.id, FakeEngine(), output_dir=None,
                                include_paths=(str(TEST_TASKS),))
    found = contexts(store, job.id)
    assert len(found) == 2 and all(c.startswith(SYSTEM_TURN) and c.endswith(ASSISTANT) for c in found)
    # fewshot_as_multiturn unset: lm-eval's default with a template, one turn per example
    assert all(c.count("<|im_start|>user\n") == 2 for c in found)
    assert len(results["config"]["chat_template_sha256"]) == 64  # lm-eval's `config`


def test_chat_options_are_checked_and_old_specs_still_load():
    with pytest.raises(ValueError, match="needs --apply-chat-template"):
        JobSpec(tasks=("t",), fewshot_as_multiturn=True)
    old = {"tasks": ["t"], "model": MODEL, "limit": None, "num_fewshot": None, "data_dir": None,
           "gen_kwargs": {}, "seed": 0, "source": "tasks", "samples": None, "fingerprint": None}
    assert JobSpec.from_dict(old) == JobSpec(tasks=("t",))
    assert "apply_chat_template" not in JobSpec(tasks=("t",)).to_dict()  # stored as before
    chat = JobSpec(tasks=("t",), apply_chat_template=True, fewshot_as_multiturn=False,
                   system_instruction=SYSTEM)
    assert JobSpec.from_dict(chat.to_dict()) == chat


def test_a_name_lm_eval_would_not_render_with_is_refused():
    """lm-eval renders with the tokenizer's default template whatever name it is given; of
    several templates, another name is refused rather than recorded for text it did not make."""
    from conserve_bench.engine.chat import ChatTemplates

    lm = ConserveLM.__new__(ConserveLM)
    lm._templates, lm._rendering = ChatTemplates(MODEL, {"default": "{{ 'd' }}", "tool_use": "{{ 't' }}"}), None
    lm.backend = None
    assert lm.chat_template(True) == lm.chat_template("default") == "{{ 'd' }}"
    with pytest.raises(ModelArgsError, match="not the tokenizer's default"):
        lm.chat_template("tool_use")
    with pytest.raises(ModelArgsError, match="no chat template named 'nope'"):
        lm.chat_template("nope")


# -- client mode: the template from the server's job API ------------------------------------------


@pytest.fixture
def job_api(store, monkeypatch):
    """A job API (no engine) and `JobClient`s that reach it in process."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from conserve_bench.serve import client as client_module
    from conserve_bench.serve.jobapi import install_job_api
    from conserve_bench.serve.server import ServeConfig

    app = FastAPI()
    install_job_api(app, store, ServeConfig(), "smollm2-135m|float32|8192|w=abc|vllm=0.32.0+cpu", 8192)
    http = TestClient(app)

    class InProcess(client_module.JobClient):
        def __init__(self, base_url: str, api_key: str | None = None, **kwargs):
            super().__init__(base_url, api_key, **kwargs)
            self._http = http

    monkeypatch.setattr(client_module, "JobClient", InProcess)
    return http


def test_client_mode_renders_what_embedded_mode_and_the_tokenizer_render(job_api, model_ref, tokenizer):
    remote = ConserveLM(base_url="http://testserver", model=MODEL, dtype="float32", max_length=8192,
                        progress=False)
    loaded = SimpleNamespace(cfg=SimpleNamespace(model_path=model_ref.path, model_name=model_ref.name),
                             fingerprint="fake")  # a fake engine that says what it loaded
    embedded = ConserveLM.for_job(None, None, "job", "fake", engine=loaded)
    for chat in CHATS:
        for add_generation_prompt in (True, False):
            turns = chat if add_generation_prompt else [*chat, {"role": "assistant", "content": "Ans:"}]
            theirs = tokenizer.apply_chat_template(turns, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt,
                                                   continue_final_message=not add_generation_prompt)
            assert remote.apply_chat_template(turns, add_generation_prompt) == theirs
            assert embedded.apply_chat_template(turns, add_generation_prompt) == theirs
    assert remote.get_model_info() == embedded.get_model_info()
    assert remote.backend.chat_template_sha256 == embedded.get_model_info()["chat_template_sha256"]
    with pytest.raises(ModelArgsError, match="the server runs max_model_len=8192"):
        ConserveLM(base_url="http://testserver", max_model_len=4096)


def test_a_client_mode_job_records_the_template_that_rendered_its_requests(job_api, store):
    """The requests a chat-templated client-mode run posts: their job's spec names the template."""
    from lm_eval.api.instance import Instance

    remote = ConserveLM(base_url="http://testserver", progress=False)
    context = remote.apply_chat_template(CHATS[0])
    request = {"kind": "generate_until", "args": [context, {"until": ["\n"]}]}
    earlier = job_api.post("/v1/jobs/requests", json={"requests": [request]}).json()
    store.claim_items(earlier["id"], "me", 1)
    store.complete_items("me", {earlier["keys"][0]: " 4"})  # no pump here: computed already
    assert remote.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"]}), 0)]) == [" 4"]
    newest = store.list_jobs()[0]
    assert newest.id != earlier["id"] and newest.spec.source == "requests"
    assert newest.spec.chat_template_sha256 == remote.get_model_info()["chat_template_sha256"]


def test_the_job_api_records_chat_options_and_the_template_of_requests(job_api, store):
    sha256 = "ab" * 32
    work = {"requests": [{"kind": "generate_until", "args": ["<|im_start|>user\nQ", {}]}],
            "chat_template_sha256": sha256}
    job = job_api.post("/v1/jobs/requests", json=work).json()
    assert store.get_job(job["id"]).spec.chat_template_sha256 == sha256
    bad = job_api.post("/v1/jobs/requests", json={**work, "chat_template_sha256": "not a hash"})
    assert bad.status_code == 422

    body = {"tasks": ["conserve_tiny_gen"], "fewshot_as_multiturn": True}
    refused = job_api.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and "needs --apply-chat-template" in refused.text
    served = job_api.get("/v1/jobs/model").json()
    assert (served["model"], served["dtype"], served["max_model_len"]) == (MODEL, "float32", 8192)


def test_ci_configs_take_chat_options_file_wide(tmp_path):
    from conserve_bench.ci.suite import CIConfigError, load_configs

    path = tmp_path / "chat.yaml"
    path.write_text("model: smollm2-135m\napply_chat_template: true\nsystem_instruction: Be brief.\n"
                    "tasks:\n  conserve_tiny_gen:\n    limit: 2\n")
    (spec,) = load_configs([str(path)], needs_baselines=False)[0].job_specs()
    assert (spec.apply_chat_template, spec.system_instruction) == (True, "Be brief.")
    path.write_text("model: smollm2-135m\nfewshot_as_multiturn: true\ntasks:\n  t:\n")
    with pytest.raises(CIConfigError, match="fewshot_as_multiturn: --fewshot-as-multiturn needs"):
        load_configs([str(path)], needs_baselines=False)
    path.write_text("model: smollm2-135m\napply_chat_template: 3\ntasks:\n  t:\n")
    with pytest.raises(CIConfigError, match="apply_chat_template: must be true, false or a template name"):
        load_configs([str(path)], needs_baselines=False)


def test_submit_records_the_chat_options(run_cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    code, _, err = run_cli("submit", "conserve_tiny_gen", "--include-path", TEST_TASKS, "--db", db,
                           "--no-wait", "--apply-chat-template", "--no-fewshot-as-multiturn",
                           "--system-instruction", SYSTEM)
    assert code == 0, err
    (job,) = Store(db).list_jobs()
    assert (job.spec.apply_chat_template, job.spec.fewshot_as_multiturn,
            job.spec.system_instruction) == (True, False, SYSTEM)
