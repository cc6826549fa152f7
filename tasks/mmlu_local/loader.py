"""Dataset loader of the `mmlu_local_*` tasks: MMLU rows from local CSV files.

lm-eval calls it with the task's metadata (which holds --model_args and --metadata, so
`data_dir=...` in either works) and `dataset_kwargs` (the subject). It returns exactly the
rows lm-eval gets from the hub's `cais/mmlu`, via `conserve_bench.jobs.taskspec.load_mmlu_csv`.
"""

import os

from conserve_bench.errors import DataDirError
from conserve_bench.jobs.taskspec import check_data_dir, load_mmlu_csv


def load_mmlu(subject: str, data_dir: str | None = None, **_metadata):
    # NOTE: this is an edge (lm-eval imports it from the task YAML), hence the env fallback.
    data_dir = data_dir or os.environ.get("CONSERVE_BENCH_DATA")
    if not data_dir:
        raise DataDirError("mmlu_local tasks need the MMLU CSV folder: pass data_dir=DIR in "
                           "--model_args or --metadata, or set CONSERVE_BENCH_DATA")
    check_data_dir(data_dir)
    return load_mmlu_csv(data_dir, subject)
