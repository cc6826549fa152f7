"""Latency profiles: measuring this machine's step latency, and storing the model by key.

`profiler` starts an engine (`engine.local.start_engine`) that logs every step, runs probes
of known shapes through it and fits `sched.latency.LatencyModel` on what the step log
recorded; `profiles` keys a fitted model by model, dtype, device and vLLM version in the
store. An application service over `engine`, `store` and `sched`; never imported by them.
"""
