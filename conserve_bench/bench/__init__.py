"""`conserve-bench bench`: what co-serving costs online latency and gains offline throughput.

`setting` is what a run is; `workload` builds online requests (trace or synthetic, pure);
`loadgen` sends and times them; `phases` drives the phases, one fresh server per policy;
`summary` turns records into `report.json` (pure), `tables` into rows and `report.md`;
`plots` draws them; `longprompts` writes a KV-heavy offline task.
"""
