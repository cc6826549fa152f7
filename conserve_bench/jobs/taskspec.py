"""Task spec -> lm-eval tasks: names are resolved and checked, local data is wired in.

Tasks come from lm-eval's own task system (its built-in YAML, our `tasks/` folder and the
folders `serve --include-path` names). A task YAML file is taken by path only where the
caller allows it (`submit` on one's own machine); never over HTTP, where a YAML's `!function`
tags would run the sender's Python. With a data directory, every task whose dataset is the
hub's `cais/mmlu` reads the original MMLU CSV files instead (`test/<subject>_test.csv`,
`dev/`, `val/`; no header: question,A,B,C,D,answer), producing exactly the rows lm-eval gets
from the hub. A client's data directory is taken only under the roots the server offers.

lm-eval's task index (its ~15,000 YAML files parsed, 10-20 s on 2 CPU cores) is cached on
disk, keyed by every indexed file's path, size and modification time.

lm-eval names relied on: docs/vllm-contract.md#lm-eval.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import logging
import os
import pickle
import tempfile
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from pathlib import Path

from conserve_bench.config import cache_home
from conserve_bench.errors import DataDirError, TaskNameError, UnknownTaskError

log = logging.getLogger(__name__)

MMLU_HUB_PATH = "cais/mmlu"
MMLU_SPLITS = {"test": "test", "validation": "val", "dev": "dev"}
LETTERS = "ABCD"
TASK_FILE_SUFFIXES = (".yaml", ".yml")
GLOB_CHARS = "*?["
PATH_SEPARATORS = "/\\"


@functools.cache
def _task_manager_class():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    class LocalDataFactory(TaskFactory):
        """Builds lm-eval tasks, pointing hub datasets we hold locally at local files."""

        def __init__(self, *, meta=None, data_dir: str | None = None):
            super().__init__(meta=meta)
            self.data_dir = data_dir

        def _load_full_config(self, entry, overrides=None):
            cfg = super()._load_full_config(entry, overrides)
            if self.data_dir and cfg.get("dataset_path") == MMLU_HUB_PATH:
                cfg["custom_dataset"] = functools.partial(
                    _load_hub_subject, self.data_dir, cfg["dataset_name"]
                )
            return cfg

    class LocalDataTaskManager(TaskManager):
        def __init__(self, data_dir: str | None = None, **kwargs):
            with _cached_task_index():
                super().__init__(**kwargs)
            self._factory = LocalDataFactory(meta=self.metadata, data_dir=data_dir)

    return LocalDataTaskManager


@contextlib.contextmanager
def _cached_task_index():
    """While a TaskManager is built, its index comes from the disk cache.

    NOTE: `TaskManager.__init__` builds its index with `TaskIndex().build(paths)`, looked up in
    its module at call time; swapping in a subclass whose `build` caches is the one way in.
    """
    import lm_eval.tasks.manager as manager

    base = manager.TaskIndex

    class CachedTaskIndex(base):
        @staticmethod
        def build(paths: Iterable[Path], **kwargs):
            return load_task_index(list(paths), lambda: base.build(paths, **kwargs))

    manager.TaskIndex = CachedTaskIndex
    try:
        yield
    finally:
        manager.TaskIndex = base


def load_task_index(paths: list[Path], build):
    """The index `build()` returns for `paths`, cached under a key of every file below them."""
    cache = cache_home() / "task-index" / f"{_index_key(paths)}.pickle"
    with contextlib.suppress(OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return pickle.loads(cache.read_bytes())
    index = build()
    with contextlib.suppress(OSError, pickle.PicklingError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, delete=False) as f:
            f.write(pickle.dumps(index))
        os.replace(f.name, cache)  # NOTE: atomic: a concurrent reader never sees half a file
    return index


def _index_key(paths: list[Path]) -> str:
    digest = hashlib.sha256(f"lm-eval {version('lm-eval')}".encode())
    for root in paths:
        digest.update(f"\0{Path(root).resolve()}".encode())
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(folder, name))
                digest.update(f"\0{folder}/{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def task_manager(data_dir: str | None = None, include_paths: tuple[str, ...] = ()):
    """An lm-eval TaskManager over built-in tasks, ours and those in the folders
    `include_paths`, reading MMLU from `data_dir`.

    One per data directory, folders and process: it holds only the task index and how to load.
    """
    from conserve_bench.tasks import TASKS_DIR

    if data_dir is not None:
        check_data_dir(data_dir)
    # NOTE: the metadata reaches our own local-data tasks (`mmlu_local_*`) as `data_dir`.
    metadata = {"data_dir": data_dir} if data_dir is not None else None
    return _task_manager_class()(data_dir=data_dir, include_path=[str(TASKS_DIR), *include_paths],
                                 metadata=metadata)


def check_tasks(names: Sequence[str], manager, *, allow_paths: bool = False) -> list[str]:
    """Raise UnknownTaskError (with suggestions) unless every name is a task, group or tag of
    the index; with `allow_paths`, a task YAML file given by its path too (`looks_like_path`).

    NOTE: lm-eval loads a name missing from its index as a file path, and a YAML's `!function`
    tags import Python beside it. A name passes here only from the index or, when allowed, as
    a path that looks like one: a bare name is never read from the working directory, so a
    name that reached the store through the job API cannot load a file even where the index
    lacks it (another replica, another `--include-path`).
    """
    known = set(manager.all_tasks)
    for name in names:
        if name in known or (allow_paths and looks_like_path(name) and _is_file(name)):
            continue
        raise _not_a_task(name, known, allow_paths)
    return list(names)


def looks_like_path(name: str) -> bool:
    """Whether a task name is written as a file path: a folder in it, `~`, or a YAML suffix."""
    return (any(sep in name for sep in PATH_SEPARATORS) or name.startswith("~")
            or name.lower().endswith(TASK_FILE_SUFFIXES))


def _is_file(name: str) -> bool:
    return Path(name).expanduser().is_file()  # NOTE: as lm-eval reads it (`entry_from_path`)


def _not_a_task(name: str, known: set[str], allow_paths: bool) -> UnknownTaskError:
    if any(c in name for c in GLOB_CHARS):
        return TaskNameError(f"task {name!r} is a pattern; name each task, or a group")
    if looks_like_path(name) and not allow_paths:
        return TaskNameError(f"task {name!r} is a path; only task names are taken here "
                             "(serve --include-path adds a folder of task YAML to them)")
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UnknownTaskError(f"unknown task {name!r}{hint}")


def offered_data_dir(data_dir: str, roots: Sequence[str]) -> str:
    """`data_dir` resolved (symbolic links, `..`), if it is a folder of MMLU CSV files at or
    below one of `roots` (the folders a server offers its clients); else a DataDirError that
    names no path."""
    if not roots:
        raise DataDirError("this server takes no data_dir (serve --data-root offers folders)")
    resolved = Path(os.path.realpath(data_dir))
    if not (Path(data_dir).is_absolute()
            and any(resolved.is_relative_to(os.path.realpath(root)) for root in roots)):
        # NOTE: one message whether the folder exists or not: a client must not learn of
        # the server's other folders by probing.
        raise DataDirError("data_dir must be an absolute path under a folder this server "
                           "offers (serve --data-root)")
    if not (resolved / "test").is_dir():
        raise DataDirError("data_dir has no test/ folder of MMLU CSV files")
    return str(resolved)


def check_data_dir(data_dir: str) -> None:
    path = Path(data_dir)
    if not path.is_dir():
        raise DataDirError(f"data directory {data_dir!r} does not exist")
    if not (path / "test").is_dir():
        raise DataDirError(f"data directory {data_dir!r} has no test/ folder of MMLU CSV files")


def _load_hub_subject(folder: str, hub_subject: str, **_metadata):
    # NOTE: lm-eval passes the task's metadata as keywords (ours may hold `data_dir`),
    # hence parameter names no metadata key uses.
    return load_mmlu_csv(folder, hub_subject)


def load_mmlu_csv(data_dir: str, subject: str):
    """Load one MMLU subject (or `all`) from CSV in the layout of the hub's `cais/mmlu`."""
    import datasets

    features = datasets.Features({
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(num_classes=4, names=list(LETTERS)),
    })
    splits = {}
    for split, folder in MMLU_SPLITS.items():
        rows = _read_subject_rows(Path(data_dir) / folder, folder, subject)
        splits[split] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(splits)


def _read_subject_rows(folder: Path, split: str, subject: str) -> list[dict]:
    import csv

    pattern = f"*_{split}.csv" if subject == "all" else f"{subject}_{split}.csv"
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataDirError(f"no MMLU file {folder / pattern}")
    rows = []
    for file in files:
        name = file.name[: -len(f"_{split}.csv")]
        with open(file, newline="", encoding="utf-8") as f:
            for question, a, b, c, d, answer in csv.reader(f):
                rows.append({"question": question, "subject": name, "choices": [a, b, c, d],
                             "answer": LETTERS.index(answer.strip())})
    return rows
