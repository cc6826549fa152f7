"""OpenAI requests as work items: a batch's lines, run by vLLM's own OpenAI handlers.

`OpenAIRequestEngine` keeps the engine contract (`contract.ItemEngine`) for items of kind
"openai" (`args`: `url`, `body`, `request_id`): each runs through the same handler object
vLLM's app answers that URL with (`OpenAIHandlers`, built by `init_app_state` as vLLM's
`run-batch` builds its own), so a line's response is the response the same request gets
over HTTP, and its result is `{"status_code", "body"}` as the route would answer. The
handlers talk to the server's `AsyncLLM` through `OfflineClient`, which runs every request
at offline priority and streams a generation's tokens into `partials()`; a generation that an
earlier run was interrupted in continues after its saved tokens (prompt + partial, fewer
tokens to go) and answers with the whole generation, when it can continue (`can_continue`):
one sequence, no logprobs, no stop strings, greedy or unseeded, no output-only penalty. An
engine that died is never a line's failure: `step` raises `EngineUnavailableError`.

vLLM names relied on: docs/vllm-contract.md#batch-api.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import queue
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conserve_bench.engine.contract import Partials
from conserve_bench.engine.generation import OUTPUT_ONLY_KEYS
from conserve_bench.errors import EngineUnavailableError, one_line_error
from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY

Answer = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)
Handler = Callable[[dict[str, Any], str], Awaitable[Answer]]


@dataclass
class _Stream:
    """A line's generation in flight: the tokens it continued from, then what vLLM streamed."""

    key: str
    resumed: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    resumable: bool = False


class OfflineClient:
    """The server's engine client as the batch handlers see it: `generate` at offline
    priority, continuing from saved tokens and streaming them; everything else is the
    client's own."""

    def __init__(self, client, stream_tokens: int = 16):
        """`stream_tokens`: how many tokens a streamed generation hands over at a time (the
        runner saves partials as often); 0: none is streamed, so none continues."""
        self._client = client
        self.stream_tokens = stream_tokens
        self.num_streamed_tokens = 0  # tokens streamed (generated) for lines since the start
        self._streams: dict[str, _Stream] = {}  # our request id -> its line's generation
        self._partials: dict[str, list[int]] = {}  # item key -> tokens to continue from

    def __getattr__(self, name):
        return getattr(self._client, name)

    def expect(self, request_id: str, key: str, partial: Sequence[int] = ()) -> None:
        self._streams[request_id] = _Stream(key)
        if partial:
            self._partials[key] = list(partial)

    def forget(self, request_id: str) -> bool:
        """Drop a finished line's stream; whether its tokens were streamed (and counted)."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        self._partials.pop(stream.key, None)
        return stream.resumable

    def partials(self) -> dict[str, list[int]]:
        return {s.key: [*s.resumed, *s.token_ids] for s in self._streams.values()
                if s.resumable and (s.resumed or s.token_ids)}

    def _stream_of(self, vllm_request_id: str) -> _Stream | None:
        # NOTE: the handlers name a request "<prefix>-<our id>[-<i>]" (chatcmpl-, cmpl-)
        return next((s for rid, s in self._streams.items() if rid in vllm_request_id), None)

    def generate(self, prompt, sampling_params, request_id: str, *args, **kwargs):
        kwargs["priority"] = OFFLINE_PRIORITY
        stream = self._stream_of(request_id)
        if stream is None or not self.stream_tokens or not can_continue(prompt, sampling_params):
            return self._client.generate(prompt, sampling_params, request_id, *args, **kwargs)
        stream.resumable = True
        stream.resumed = self._partials.get(stream.key, [])
        return self._continued(stream, prompt, sampling_params, request_id, args, kwargs)

    async def _continued(self, stream: _Stream, prompt, params, request_id: str, args, kwargs):
        """The generation after `stream.resumed`, streamed; yields one final output of the
        whole generation, as a non-streaming handler expects."""
        from vllm.sampling_params import RequestOutputKind

        resumed = stream.resumed
        params = copy.copy(params)
        params.output_kind = RequestOutputKind.DELTA
        # NOTE: every `stream_tokens` tokens, not every token: each output wakes this process,
        # which shares the host with the engine on a CPU build
        params.stream_interval = self.stream_tokens
        if resumed:
            prompt = {**prompt, "prompt_token_ids": [*prompt["prompt_token_ids"], *resumed]}
            params.max_tokens -= len(resumed)
            if params.min_tokens:
                params.min_tokens = max(0, params.min_tokens - len(resumed))
        final, text = None, []
        outputs = self._client.generate(prompt, params, request_id, *args, **kwargs)
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                final = output
                stream.token_ids.extend(output.outputs[0].token_ids)
                self.num_streamed_tokens += len(output.outputs[0].token_ids)
                text.append(output.outputs[0].text)
        if final is None:
            return
        whole = final.outputs[0]
        whole.token_ids = [*resumed, *stream.token_ids]
        whole.text = "".join(text)
        if resumed:
            final.prompt_token_ids = final.prompt_token_ids[:len(final.prompt_token_ids) - len(resumed)]
            tokenizer = self._client.get_tokenizer()
            whole.text = tokenizer.decode(whole.token_ids, skip_special_tokens=params.skip_special_tokens)
        yield final


def can_continue(prompt, params) -> bool:
    """Whether a generation may be streamed and continued from saved tokens with the same
    result: token input, one sequence, no logprobs (the saved tokens have none), no stop
    strings (one could straddle the seam), greedy or unseeded (a seeded sample's random
    stream would restart), no penalty vLLM counts over its own output."""
    from vllm.sampling_params import RequestOutputKind

    if not isinstance(prompt, Mapping) or prompt.get("type", "token") != "token" or "prompt_token_ids" not in prompt:
        return False
    if params.output_kind != RequestOutputKind.FINAL_ONLY or params.n != 1 or params.stop:
        return False
    if params.logprobs is not None or params.prompt_logprobs is not None:
        return False
    if any(getattr(params, key, None) for key in OUTPUT_ONLY_KEYS if key != "bad_words") or params.bad_words:
        return False
    return not params.temperature or params.seed is None


class OpenAIHandlers:
    """vLLM's OpenAI handlers for the batch endpoints, over an `OfflineClient`, answering a
    JSON body as the HTTP route would: `(status, body)`."""

    def __init__(self, state, client: OfflineClient):
        self.client = client
        self._handlers: dict[str, Handler] = {}
        if (chat := getattr(state, "openai_serving_chat", None)) is not None:
            self._handlers["/v1/chat/completions"] = self._route(chat.create_chat_completion, "chat")
        if (completion := getattr(state, "openai_serving_completion", None)) is not None:
            self._handlers["/v1/completions"] = self._route(completion.create_completion, "completion")
        if (embedding := getattr(state, "serving_embedding", None)) is not None:
            self._handlers["/v1/embeddings"] = self._route(embedding, "embedding")

    @classmethod
    async def create(cls, engine_client, args, supported_tasks, stream_tokens: int = 16) -> OpenAIHandlers:
        """Handlers of their own (vLLM's `init_app_state`, as `run-batch` builds them) over
        the server's engine, seen through an `OfflineClient` (`stream_tokens`: its)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        client, state = OfflineClient(engine_client, stream_tokens), State()
        await init_app_state(client, state, args, supported_tasks)
        return cls(state, client)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    async def answer(self, url: str, body: dict[str, Any], request_id: str) -> Answer:
        handler = self._handlers.get(url)
        if handler is None:
            return 404, _error(f"this server's model does not serve {url}", "NotFoundError", 404)
        return await handler(body, request_id)

    @staticmethod
    def _route(handler, kind: str) -> Handler:
        model = _request_model(kind)

        async def answer(body: dict[str, Any], request_id: str) -> Answer:
            from pydantic import ValidationError
            from vllm.entrypoints.serve.engine.protocol import ErrorResponse

            try:
                request = model({**body, "request_id": request_id})
            except ValidationError as e:
                return 400, _error(_validation_message(e), "BadRequestError", 400)
            try:
                response = await handler(request, None)
            except Exception as e:  # NOTE: as vLLM's routes: an error response, not a crash
                from vllm.entrypoints.serve import create_error_response

                response = create_error_response(e)
            if isinstance(response, ErrorResponse):
                return response.error.code, response.model_dump()
            return 200, response.model_dump()

        return answer


def _request_model(kind: str):
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest.model_validate
    if kind == "completion":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest.model_validate
    from pydantic import TypeAdapter
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return TypeAdapter(EmbeddingRequest).validate_python


def _validation_message(error) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    """vLLM's error body (`ErrorResponse`), as its routes answer."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIRequestEngine:
    """Runner-facing engine of "openai" items over `OpenAIHandlers`, on the server's loop;
    called from the pump thread."""

    def __init__(self, handlers: OpenAIHandlers, loop: asyncio.AbstractEventLoop,
                 fingerprint: str, is_dead: Callable[[], bool] = lambda: False,
                 on_tokens: Callable[[int], None] | None = None,
                 on_answered: Callable[[str, dict[str, Any]], None] | None = None):
        self.handlers, self.loop, self.fingerprint = handlers, loop, fingerprint
        self._is_dead = is_dead
        self.on_tokens = on_tokens or (lambda num_tokens: None)
        # a line answered 200: (its batch, the response's `usage`): tokens harvested per batch
        self.on_answered = on_answered or (lambda batch_id, usage: None)
        self._inflight: dict[str, asyncio.Future] = {}  # item key -> its request
        self._finished: queue.Queue = queue.Queue()
        self._num_unstreamed_tokens = 0  # generated by lines whose tokens were not streamed
        self._num_reported = 0  # tokens handed to `on_tokens`

    @property
    def is_dead(self) -> bool:
        return self.loop.is_closed() or self._is_dead()

    def submit(self, work: Sequence[Any], partials: Partials | None = None) -> None:
        if self.is_dead:
            raise EngineUnavailableError("the server's engine died; its batch lines go back to "
                                         "pending for a restarted server")
        partials = partials or {}
        for item in work:
            args = item.args
            self.handlers.client.expect(args["request_id"], item.key, partials.get(item.key, ()))
            self._inflight[item.key] = asyncio.run_coroutine_threadsafe(
                self._run(item.key, args), self.loop)

    async def _run(self, key: str, args: dict[str, Any]) -> None:
        streamed = False
        try:
            status, body = await self.handlers.answer(args["url"], args["body"], args["request_id"])
            result: Any = {"status_code": status, "body": body}
        except BaseException as e:  # surfaced in step(), on the pump thread
            result = e
        finally:
            streamed = self.handlers.client.forget(args["request_id"])
        self._finished.put((key, args["batch_id"], result, streamed))

    def step(self) -> list[tuple[str, Any]]:
        """Wait up to 50 ms for finished lines; (item key, result) of each."""
        try:
            batch = [self._finished.get(timeout=0.05)]
        except queue.Empty:
            if self.is_dead:
                raise EngineUnavailableError("the server's engine died") from None
            self._report_tokens()
            return []
        while not self._finished.empty():
            batch.append(self._finished.get_nowait())
        finished = []
        for key, batch_id, result, streamed in batch:
            if self._inflight.pop(key, None) is None:
                continue  # aborted
            if isinstance(result, BaseException):
                if self.is_dead or not isinstance(result, Exception):
                    raise EngineUnavailableError(f"the server's engine died: {one_line_error(result)}")
                result = {"status_code": 500, "body": _error(one_line_error(result), "InternalServerError", 500)}
            usage = result["body"].get("usage") or {}
            if not streamed:  # NOTE: a streamed line's tokens were counted as they came
                self._num_unstreamed_tokens += usage.get("completion_tokens") or 0
            if result["status_code"] == 200:
                self.on_answered(batch_id, usage)
            finished.append((key, result))
        self._report_tokens()
        return finished

    def _report_tokens(self) -> None:
        num_tokens = self.num_generated_tokens
        if num_tokens > self._num_reported:
            self.on_tokens(num_tokens - self._num_reported)
            self._num_reported = num_tokens

    def partials(self) -> dict[str, list[int]]:
        return self.handlers.client.partials()

    @property
    def num_pending_items(self) -> int:
        return len(self._inflight)

    @property
    def num_generated_tokens(self) -> int:
        """Tokens generated for lines since the start: streamed ones as they come (saved
        tokens a line continued from not counted), the others once their line finished."""
        return self.handlers.client.num_streamed_tokens + self._num_unstreamed_tokens

    def abort_all(self) -> None:
        """Cancel every line in flight: vLLM aborts a request whose handler is cancelled."""
        inflight, self._inflight = self._inflight, {}
        for future in inflight.values():
            future.cancel()
