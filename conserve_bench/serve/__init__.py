"""`conserve-bench serve`: vLLM's OpenAI app for online traffic, eval jobs behind it.

`server` builds the app and the engine; `jobapi` adds `/v1/jobs`; `pump` runs queued jobs
at offline priority; `metrics` adds Prometheus series; `client` is the job API's HTTP
client; `process` starts a server subprocess (for `bench` and the tests).
"""
