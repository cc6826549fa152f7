"""The durable job store: jobs, work items and latency profiles behind one repository API.

Every SQL statement of conserve-bench lives in this package: `repository.Store` (the API;
callers see plain dataclasses `Job`, `WorkItem`), `schema` (the current tables),
`migrations` (each schema change, frozen), `db` (URLs and dialects), `states` (job and item
states). SQLite (WAL) is the embedded default; PostgreSQL works too. The schema migrates
itself on open. Nothing here imports the engine, the scheduler or lm-eval.
"""

from conserve_bench.store.migrations import MIGRATIONS
from conserve_bench.store.repository import Job, Store, WorkItem
from conserve_bench.store.states import ItemState, JobState, WorkerState

__all__ = ["MIGRATIONS", "ItemState", "Job", "JobState", "Store", "WorkItem", "WorkerState"]
