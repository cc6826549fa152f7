"""Task resolution and local MMLU data, without an engine."""

from __future__ import annotations

import pytest

from conserve_bench.errors import DataDirError, UnknownTaskError
from conserve_bench.jobs.taskspec import check_tasks, load_mmlu_csv, task_manager


@pytest.fixture(scope="module")
def manager(data_dir):
    return task_manager(data_dir)


def test_local_mmlu_has_the_hub_layout(data_dir):
    ds = load_mmlu_csv(data_dir, "abstract_algebra")
    assert set(ds) == {"test", "validation", "dev"}
    assert (len(ds["test"]), len(ds["validation"]), len(ds["dev"])) == (100, 11, 5)
    row = ds["dev"][0]
    assert row == {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
                   "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"], "answer": 1}


def test_mmlu_group_reads_all_57_subjects_locally(manager):
    tasks = list(manager.load(["mmlu"])["tasks"].values())
    assert len(tasks) == 57
    anatomy = next(t for t in tasks if t.config.task == "mmlu_anatomy")
    assert len(anatomy.test_docs()) == 135
    assert anatomy.doc_to_text(anatomy.test_docs()[0]).endswith("Answer:")


def test_unknown_task_suggests_close_names(manager):
    with pytest.raises(UnknownTaskError, match="mmlu_anatomy"):
        check_tasks(["mmlu_anatomi"], manager)
    assert check_tasks(["mmlu", "mmlu_abstract_algebra"], manager) == ["mmlu", "mmlu_abstract_algebra"]


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataDirError, match="does not exist"):
        task_manager(str(tmp_path / "nope"))
    with pytest.raises(DataDirError, match="test/"):
        task_manager(str(tmp_path))
