"""The benchmarks behind the measured tables of docs/: each module measures one claim on this
host (armed safepoints' cost, KV checkpoints under churn, the store under a fleet, conserve
against lm-eval's `hf`...) with real engines, servers or stores, one command each.

Run them from the repository root as modules, `python -m benchmarks.<name> [--help]`. Each
starts with this host's `profile --quick` (`--no-profile` skips it) and ends by writing its
record, `benchmarks/measured/<name>.json` (`common.Measured`: date, command, host, config,
result; `--measured PATH` for a smoke run that must not replace it). The records are committed,
and the docs' tables are generated from them: `python -m benchmarks.tables` rewrites every
`<!-- measured:NAME -->` block of docs/*.md, `--check` fails when one differs. Nothing in the
product imports this package.
"""
