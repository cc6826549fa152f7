"""The engine layer: vLLM driven item by item, through its own plug points only.

`contract` writes down what the runner asks of an engine (`ItemEngine`) and the prompt
bookkeeping the vLLM engines share; `prompts` turns lm-eval requests into token prompts and
engine outputs back into item results (lm-eval's exact semantics), and `generation`
continues an interrupted `generate_until` from its checkpointed tokens; `local` runs vLLM in this
process (`submit`, `profile`, the lm-eval backend); `async_llm` drives the server's
`AsyncLLM`; `fake` is a deterministic engine for tests; `plugin` holds the conventions shared
with vLLM (priorities, scheduler class, `additional_config` layout); `models` resolves a
`--model` value to a directory vLLM can load; `connector` (vLLM's KV connector), `worker`
(vLLM's worker), `safepoints` and `arrivals` (the shared arrival signal) carry layer-wise
preemption; the connector with `checkpoints` and `kvpool` (the host pool) carries
incremental KV checkpointing. Nothing here touches the store.
"""
