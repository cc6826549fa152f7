"""Jobs: from a task spec to lm-eval results through durable work items.

`taskspec` resolves lm-eval task names (and local MMLU data); `genkwargs` checks a job's
generation arguments; `lifecycle` submits, runs, resumes and cancels jobs; `results` writes
their results in lm-eval's layout (and `results/<job-id>.json`); `runner` feeds a job's
pending items to an engine and commits results in batches; `replica` is this process as one
replica of a fleet (its heartbeat and leases); `samples` writes lm-eval's logged samples and
reduces them to the per-document table. None of them builds prompts or holds SQL.
"""
