"""conserve-bench: LLM evaluation suites on the idle cycles of a serving engine (ConServe).

Layers, one subpackage each: `jobs` (task specs, job lifecycle, the runner) over `store`
(durable jobs and work items, all SQL) and `engine` (vLLM driven item by item; the engine
contract and the vLLM conventions); `sched` (latency model, the pure ConServe policy, vLLM's
scheduler subclass, profiling); `serve` (online OpenAI traffic with jobs behind it) and
`bench` (what co-serving costs and gains). `cli` is a thin shell over them; the lm-eval
backend is `conserve_bench.harness`. The data path: task spec -> lm-eval instances -> work
items -> engine requests -> results committed -> lm-eval metrics -> `results/*.json`.
"""

__version__ = "0.1.0"
