"""The durable job store: jobs, work items and latency profiles behind one repository API.

Every SQL statement of conserve-bench lives in this package: `repository.Store` (the API;
callers see plain dataclasses `Job`, `WorkItem`, keyed by request content: `item_key`),
built on `base` (the connection, retried transactions) with its parts `partials`
(saved tokens), `replicas` (heartbeats) and `profile_rows` (latency profiles); `leases`
(claim, complete, fail, renew), `schema` (the current tables), `migrations` (each schema change, frozen), `db` (URLs and
the dialects' differences), `states` (job, item and replica states); `pgcluster` starts a
throwaway PostgreSQL for tests and benchmarks. SQLite (WAL) is the embedded default;
PostgreSQL lets a fleet of processes on many machines share one store, through the same
statements. The schema migrates itself on open, each migration atomic (DDL too); a store of
a newer conserve-bench, or a file that is no database, is refused in one line and never
written to. Job state changes are compare-and-set. Errors never carry a URL's password, and
those that may reach an HTTP body no URL at all. Nothing here imports the engine, the
scheduler or lm-eval.
"""

from conserve_bench.store.migrations import MIGRATIONS
from conserve_bench.store.repository import Job, Store, WorkItem, item_key, keyed_items
from conserve_bench.store.batch_rows import Batch, RequestCounts
from conserve_bench.store.states import BatchStatus, ItemState, JobState, ReplicaState

__all__ = ["MIGRATIONS", "Batch", "BatchStatus", "RequestCounts", "ItemState", "Job", "JobState", "ReplicaState", "Store", "WorkItem",
           "item_key", "keyed_items"]
