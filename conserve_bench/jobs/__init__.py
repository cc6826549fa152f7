"""Jobs: from a task spec to lm-eval results through durable work items.

`taskspec` resolves lm-eval task names (and local MMLU data); `lifecycle` submits, runs,
resumes and cancels jobs and writes `results/<job-id>.json`; `runner` feeds a job's pending
items to an engine and commits results in batches. Neither builds prompts nor holds SQL.
"""
