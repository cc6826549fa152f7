"""`conserve-bench bench`: what co-serving costs online latency and gains offline throughput.

`workload` builds online requests (trace or synthetic, pure); `loadgen` sends and times them;
`run` drives the phases, one fresh server per policy; `report` turns records into
`report.json` (pure); `plots` draws them; `longprompts` writes a KV-heavy offline task.
"""
