"""`conserve-bench ci`: nightly eval runs that gate on baselines, resume and report for CI.

suite (the YAML config files -> frozen checks) -> nightly (jobs by run key, embedded or on
a server, until done, a deadline or a signal) -> gate (verdict per task and metric) and stats
(paired comparison with an earlier run) -> report (markdown, JUnit, JSON); `baseline` writes a
finished run's scores into its config files (`--write-baseline`). Only `nightly` touches the
store, an engine or a server; `suite` reads the YAML files and `baseline` rewrites them;
`gate`, `stats` and `report` are pure. Exit codes are `ExitCode`.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """What `conserve-bench ci` exits with; a run that did not finish is never a pass."""

    PASS = 0
    REGRESSION = 1  # a metric fell past its tolerance, or is NaN or infinite (invalid)
    USAGE = 2  # a malformed config or flag, an unknown task, a metric the run did not report
    # NOTE: an unexpected exception is 3 too (the CLI's handler): a crash must never read as a
    # verdict on the model.
    INFRASTRUCTURE = 3  # the server cannot be reached (for `--server-wait`), the engine died
    INCOMPLETE = 4  # the deadline was reached or the run was interrupted
