"""The states of jobs and work items: one definition, stored as their plain string values.

A job: queued -> running -> done | failed | cancelled (a drained or interrupted job goes back
to queued once no other replica is on it; a failed one is requeued or resumed; a queued,
running or failed one may be cancelled; done and cancelled are final). An item: pending -> running (leased by one owner)
-> done; a running item whose owner let go returns to pending, one whose lease expired is
taken by the next claim; an item that failed `max_attempts` attempts is failed. The values
are what the database and the JSON of `status`/`jobs` hold; they must never change.
"""

from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    """Equal to, hashed like and formatted as its value (so JSON and f-strings see "done")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class JobState(_StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Nothing will run: done, failed or cancelled."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


# NOTE: a failed job may be cancelled (so that no resume runs it); a done one never: its
# results stand.
CANCELLABLE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)


class ItemState(_StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ReplicaState(_StrEnum):
    ACTIVE = "active"  # heartbeating; alive while its lease has not expired
    STOPPED = "stopped"  # stopped cleanly, holding nothing


class BatchStatus(_StrEnum):
    """An OpenAI batch's status, OpenAI's values (`batches.objects`): validating ->
    in_progress -> finalizing -> completed; expired (its window passed), cancelling ->
    cancelled, failed."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED,
                        BatchStatus.FAILED)


# the statuses a batch enters with a timestamp (`<status>_at`)
STAMPED_BATCH_STATUSES = ("in_progress", "finalizing", "completed", "failed", "expired",
                          "cancelling", "cancelled")
