"""Scheduling: the step-latency model, the ConServe policy, and vLLM's scheduler adapter.

`latency` (model and fit) and `policy` (`plan_step`) are pure: plain data, no torch, no
vLLM, no clock. `scheduler.ConserveScheduler` is the only module that touches vLLM's
scheduler; `steplog` records every step, `profiler` measures and `profiles` stores by key.
"""
