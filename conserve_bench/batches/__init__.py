"""The OpenAI Batch API, run as harvested offline work (`serve`'s `/v1/files`, `/v1/batches`).

A batch is a job (`JobSpec.source == "batch"`) whose work items are its input file's lines
(kind "openai"), so the pump, every fleet replica, leases, resume and partial generations run
it as they run an evaluation. This package is the pure part: what an input file may hold
(`lines`), the objects and files OpenAI's clients read (`objects`). The store keeps the
files and batch rows (`store.batch_rows`); the engine side runs one line through vLLM's own
OpenAI handlers (`engine.openai_requests`); the HTTP side is `serve.batchapi`; a batch's
life (validating -> in_progress -> finalizing -> completed; expired, cancelling -> cancelled,
failed) is `batches.lifecycle`'s.
"""
