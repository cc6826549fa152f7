"""Typed errors that reach the user as one line.

Every failure a user can cause (bad task name, missing data, unreadable model, malformed
database URL, unknown job) is raised as a `ConserveError` subclass. The CLI prints
`str(error)` on stderr and exits with its `exit_code` (2; 3 for infrastructure: a server
that cannot be reached, an engine that died); it never shows a traceback for these.
Never raise one after a partial write: validate first, then touch the store.
"""


class ConserveError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = 2


class UnknownTaskError(ConserveError):
    pass


class DataDirError(ConserveError):
    pass


class ModelNotFoundError(ConserveError):
    pass


class DatabaseURLError(ConserveError):
    pass


class StoreVersionError(DatabaseURLError):
    """A store written by a newer conserve-bench (its schema version is past our migrations);
    it is left untouched."""


class NotAStoreError(DatabaseURLError):
    """The database file is no conserve-bench store: not an SQLite database, or a damaged
    one; it is never written to."""


class JobNotFoundError(ConserveError):
    pass


class BatchNotFoundError(JobNotFoundError):
    pass


class FileNotFoundInStoreError(JobNotFoundError):
    """No such file in the store (`/v1/files`): never a path of the server."""


class JobStateError(ConserveError):
    pass


class ForeignJobError(JobStateError):
    """A job this engine must never run: another model's tasks or requests, or the job of an
    lm-eval run in another process."""


class EngineUnavailableError(ConserveError):
    """The server cannot be reached or failed, or the engine died: infrastructure, not input."""

    exit_code = 3


class ProfileNotFoundError(ConserveError):
    pass


class OutputDirError(ConserveError):
    """The log under `--output` cannot be opened (the folder itself is checked before, by
    `cli.base.output_folder`)."""


class InvalidRequestError(ConserveError):
    pass


class SettingError(ConserveError):
    """An environment variable conserve-bench reads holds a value it cannot use."""


class ModelArgsError(ConserveError, TypeError):
    """An lm-eval `--model_args` key the `conserve` backend does not know (e.g. a typo)."""


class StoreUnavailableError(ConserveError):
    """The database stayed unreachable longer than a lease; nothing committed is lost.
    Infrastructure, not input."""

    exit_code = 3


class ItemsFailedError(ConserveError):
    """Some of a job's items failed every attempt; the job cannot produce scores."""


class TaskNameError(UnknownTaskError):
    """A task given as a file path or a pattern where only names from the task index are
    taken (the job API: a task YAML's `!function` tags would run its Python)."""


class GenKwargsError(InvalidRequestError, ValueError):
    """A generation argument (`gen_kwargs`) that is unknown, or of the wrong type or range.
    A ValueError too, so that a pydantic validator raising it answers 422."""


def first_line(error: BaseException) -> str:
    """An error's message, its first line only; its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def one_line_error(error: BaseException) -> str:
    """`Type: first line of the message` (`Type` alone without one), as a job's or an item's
    error and a report's reason show it."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
