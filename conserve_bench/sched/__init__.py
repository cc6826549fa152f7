"""Scheduling, pure: the step-latency model, the ConServe policy, and the records they work on.

`latency` (model and fit), `policy` (`plan_step`, which offline requests to preempt, when an
arrival cuts a step), `refit` (keeping the model true from live steps), `kv_checkpoints`
(the book of KV blocks held on the host) and `steplog` (a step's record and line format).
Plain data only: nothing here imports torch, vLLM, `engine` or `vllm_plugin`, or reads a
clock it is not handed (import-linter checks it: pyproject's `[tool.importlinter]`). vLLM's
adapters around it live in `vllm_plugin`; measuring and storing profiles in `profiling`.
"""
