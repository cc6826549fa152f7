"""The engine layer: vLLM driven item by item, through its public API only.

`contract` writes down what the runner asks of an engine (`ItemEngine`) and the prompt
bookkeeping the vLLM engines share; `prompts` turns lm-eval requests into token prompts and
engine outputs back into item results (lm-eval's exact semantics), and `generation`
continues an interrupted `generate_until` from its saved tokens (a partial); `local` makes engines
(`start_engine`) and runs vLLM in this process (`submit`, `profile`, the lm-eval backend);
`async_llm` drives the server's `AsyncLLM`; `fake` is a deterministic engine for tests;
`models` resolves a `--model` value to a directory vLLM can load. What vLLM loads into its own
processes (scheduler, connector, worker) is `vllm_plugin`'s, started here through
`vllm_plugin.overrides`. Nothing here touches the store or vLLM's internals.
"""
