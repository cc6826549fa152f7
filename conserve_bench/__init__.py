"""conserve-bench: LLM evaluation suites on the idle cycles of a serving engine (ConServe).

Layers, one subpackage each, from the bottom: `sched` is pure (the latency model, the ConServe
policy, the KV checkpoint book, the refit, the step log's records: no torch, no vLLM, no
clock); `store` holds every SQL statement (durable jobs and work items) and knows no engine;
`vllm_plugin` is the wing vLLM loads into its own processes (scheduler, KV connector, worker,
`engine_overrides`) and the only code that names vLLM's internals; `engine` drives vLLM item
by item through its public API and knows no store; `jobs` (task specs, the job lifecycle, the
runner) and `profiling` (latency profiles) sit over them; `serve` (online OpenAI traffic with
jobs behind it), `bench` and `ci` on top; `cli` is a thin shell over all of them, and the
lm-eval backend is `conserve_bench.harness`. `lint-imports` checks these rules (pyproject's
`[tool.importlinter]`). The data path: task spec -> lm-eval instances -> work items -> engine
requests -> results committed -> lm-eval metrics -> `results/*.json`.
"""

__version__ = "0.1.0"
