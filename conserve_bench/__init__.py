"""conserve-bench: LLM evaluation suites on the idle cycles of a serving engine (ConServe).

Data path, one module each: task spec (`taskspec`) -> lm-eval instances (`harness`) -> work
items (`store`) -> engine requests (`requests`, `engine`) -> results committed (`runner`)
-> lm-eval metrics -> `results/*.json` (`jobs`). The CLI (`cli`) is a thin shell over `jobs`.
"""

__version__ = "0.1.0"
