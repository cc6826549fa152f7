"""Scheduling: the step-latency model, the ConServe policy, and vLLM's scheduler adapter.

`latency` (model and fit) and `policy` (`plan_step`) are pure: plain data, no torch, no
vLLM, no clock. `scheduler.ConserveScheduler` and its helper `preemption` (arming and
rolling back steps for layer-wise preemption) are the only modules that touch vLLM's
scheduler; `steplog` records every step, `profiler` measures and `profiles` stores by key;
`refit` keeps the model true from live steps; `checkpoint` is the bookkeeping of incremental
KV checkpoints (which blocks of which request are on the host; pure too).
"""
