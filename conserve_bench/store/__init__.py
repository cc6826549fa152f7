"""The durable job store: jobs, work items and latency profiles behind one repository API.

Every SQL statement of conserve-bench lives in this package (`repository.Store`); callers
see plain dataclasses (`Job`, `WorkItem`). SQLite (WAL) is the embedded default; any
SQLAlchemy URL of a supported dialect works. The schema migrates itself on open.
"""

from conserve_bench.store.repository import MIGRATIONS, Job, Store, WorkItem, default_owner

__all__ = ["MIGRATIONS", "Job", "Store", "WorkItem", "default_owner"]
