"""The wing vLLM loads into its own processes, and the only code that names vLLM's internals.

`scheduler.ConserveScheduler` (`scheduler_cls`) with its `preemption` rollback and `steplog`
recorder; `connector.ConserveConnector` (`kv_connector_module_path`) with its halves
`connector_scheduler` and `connector_worker`, the `safepoints`, and the host pool `kvpool`;
`worker.PreemptibleWorker` (`worker_cls`); the shared arrival signal `arrivals`; and
`overrides`, which builds everything vLLM is given (`engine_overrides`). The decisions are
`sched`'s; this wing only adapts vLLM to them. The vLLM names it relies on are listed once,
in docs/vllm-contract.md, and pinned by the contract tests.
"""
