"""The current schema: the tables every query of the store is written against.

This is what `migrations.MIGRATIONS` must produce, from a blank database or from any older
one (tests/test_store.py checks both). Change a table here only together with a new
migration that brings existing databases to it; never edit an old migration instead.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata, sa.Column("version", sa.Integer, nullable=False)
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("num_total", sa.Integer, nullable=False, default=0),
    sa.Column("results", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("run_s", sa.Float, nullable=False, default=0.0),
    # NOTE: a caller's name for a job (`ci --run-key`): unique, yet many jobs have none, and
    # neither SQLite nor PostgreSQL counts NULLs as equal.
    sa.Column("run_key", sa.String(200)),
    # JSON: a done job's item counts, frozen with its results (`Store.save_results`)
    sa.Column("progress", sa.Text),
    sa.Index("ux_jobs_run_key", "run_key", unique=True),
)

# NOTE: `owner` is the replica holding a running item, the one that computed a done item,
# the one that failed it last; `num_runs` counts claims and is the attempt that fences a
# completion (owner, attempt); `lease_until` and `claimed_at` are on the database's clock.
items = sa.Table(
    "items",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("args", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("result", sa.Text),
    sa.Column("owner", sa.String(128)),
    sa.Column("claimed_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("num_runs", sa.Integer, nullable=False, default=0),
    sa.Column("seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("lease_until", sa.Float),
    sa.Column("num_failures", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("error", sa.Text),
    # claims walk pending items in the order they were added, and expired leases by age
    sa.Index("ix_items_claim", "state", "seq"),
    sa.Index("ix_items_lease", "state", "lease_until"),
    # a job's progress (its items by state and owner) is counted from this index alone: an
    # item's row holds its prompt and result, and reading 11,000 of them for one `GET
    # /v1/jobs/{id}` took 80 ms of the CPU the online requests' steps run on
    sa.Index("ix_items_progress", "key", "state", "owner"),
)

job_items = sa.Table(
    "job_items",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("item_key", sa.String(64), sa.ForeignKey("items.key"), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Index("ix_job_items_item", "item_key"),
)


def _profile_key() -> list[sa.Column]:
    return [sa.Column("model", sa.String(256), primary_key=True),
            sa.Column("dtype", sa.String(32), primary_key=True),
            sa.Column("device", sa.String(256), primary_key=True),
            sa.Column("vllm_version", sa.String(64), primary_key=True),
            sa.Column("parallel_size", sa.Integer, primary_key=True)]


# NOTE: a profile is valid only for its exact key (model, dtype, device, vLLM version, parallel
# size); the key is the primary key so that re-profiling replaces, never duplicates.
profiles = sa.Table(
    "profiles",
    metadata,
    *_profile_key(),
    sa.Column("model_json", sa.Text, nullable=False),
    sa.Column("num_samples", sa.Integer, nullable=False),
    sa.Column("fit_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
)

# One row per replica, the process that claims items (a `serve` replica, a `submit`, an lm-eval
# session; `jobs.replica`): its heartbeat keeps `lease_until` (database clock) ahead; `job_id`
# is the job it works on now. NOTE: the table keeps its original name, `workers`: renaming
# it would take a migration and change nothing stored, and the frozen migrations create it
# under that name. Everywhere else in the code "worker" means only vLLM's worker.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("lease_until", sa.Float, nullable=False),
    sa.Column("job_id", sa.String(32)),
    sa.Index("ix_workers_lease", "state", "lease_until"),
)

PROFILE_KEY_COLUMNS = tuple(column.name for column in _profile_key())

# NOTE: the latest live refit of a profile (`sched.refit`), under the profile's key; a new
# profile of that key replaces the refit with nothing, as it was fitted around the old one.
profile_refits = sa.Table(
    "profile_refits",
    metadata,
    *_profile_key(),
    sa.Column("state_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# NOTE: the tokens a `generate_until` item generated before its run was interrupted, so its
# next run continues after them (`engine.generation`). A row lives as long as its item: the
# tokens are cleared when the item is done, the resume counts stay for its results.
item_partials = sa.Table(
    "item_partials",
    metadata,
    sa.Column("item_key", sa.String(64), sa.ForeignKey("items.key"), primary_key=True),
    sa.Column("token_ids", sa.Text, nullable=False),  # JSON list
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("num_resumes", sa.Integer, nullable=False),  # runs that continued a partial
    sa.Column("num_reused_tokens", sa.Integer, nullable=False),  # tokens they did not redo
    sa.Column("updated_at", sa.Float, nullable=False),
)

# NOTE: the OpenAI Batch API's files (`/v1/files`): a batch's input, output and error files.
# The content is stored in the row (uploads are capped: `serve --max-batch-file-bytes`), so a
# fleet's replicas, and a restarted server, read the same files from the one store.
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(256), nullable=False),
    sa.Column("num_bytes", sa.BigInteger, nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# NOTE: one OpenAI batch (`/v1/batches`), run as the job `job_id` whose items are its lines
# (kind "openai"); `status` moves by compare-and-set (`batches.status`), each move stamping its
# `*_at`. `line_errors`: JSON, line index -> the error line of a line refused before it ran.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("num_lines", sa.Integer, nullable=False),
    sa.Column("line_errors", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text),
    sa.Column("errors", sa.Text),
    sa.Column("output_file_id", sa.String(64)),
    sa.Column("error_file_id", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    *(sa.Column(f"{stamp}_at", sa.Float) for stamp in (
        "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")),
    sa.Column("usage", sa.Text),  # JSON: the answered lines' token totals, once finalized
    sa.Column("request_counts", sa.Text),  # JSON: its request counts, frozen when finalized
)
