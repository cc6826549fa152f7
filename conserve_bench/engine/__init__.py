"""The engine layer: vLLM driven item by item, through its own plug points only.

`prompts` turns lm-eval requests into token prompts and engine outputs back into item
results (lm-eval's exact semantics); `local` runs vLLM in this process (`submit`, `profile`,
the lm-eval backend); `async_llm` drives the server's `AsyncLLM`; `models` resolves a
`--model` value to a directory vLLM can load; `connector` (vLLM's KV connector), `worker`
(vLLM's worker) and `arrivals` (the shared arrival signal) carry layer-wise preemption.
Nothing here touches the store.
"""
