"""lm-eval task definitions shipped with conserve-bench (YAML beside this file).

This folder is an lm-eval include path: `conserve_bench.jobs.taskspec` adds it to every
TaskManager it builds. Local copies of hub datasets are wired in by `taskspec`, not here.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
