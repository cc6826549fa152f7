"""A batch input file: OpenAI's JSONL (and vLLM's `run-batch` input, the same format).

Each line is `{"custom_id", "method": "POST", "url", "body"}`. A file whose lines are not all
such objects, of one endpoint, with unique `custom_id`s, is refused whole, naming the first bad
line (OpenAI fails such a batch in `validating`; here creating it is a 400). A line whose
body the endpoint refuses is not the file's fault: it goes to the error file, as OpenAI's do.
Pure: no vLLM, no store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from conserve_bench.errors import InvalidRequestError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_CUSTOM_ID_CHARS = 512


class BatchFileError(InvalidRequestError):
    """The input file cannot be a batch; `line` (1-based) is the first line at fault."""

    def __init__(self, message: str, line: int | None = None, param: str | None = None):
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line, self.param = line, param


@dataclass(frozen=True)
class Line:
    """One request of a batch: its place in the file (0-based, blank lines skipped), the id
    the client matches outputs by, the endpoint and the request body."""

    index: int
    custom_id: str
    url: str
    body: dict[str, Any]

    def args(self) -> dict[str, Any]:
        """What its work item stores (and its key hashes, with the batch id)."""
        return {"line": self.index, "custom_id": self.custom_id, "url": self.url, "body": self.body}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Line:
        return cls(args["line"], args["custom_id"], args["url"], args["body"])


def parse_lines(content: bytes, endpoint: str, max_lines: int = MAX_LINES) -> list[Line]:
    """The requests of an input file for a batch of `endpoint`; BatchFileError naming the
    first line that is not one (or the file, if it is empty or not UTF-8)."""
    if endpoint not in ENDPOINTS:
        raise BatchFileError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}",
                             param="endpoint")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BatchFileError(f"the input file is not UTF-8 (byte {e.start})") from None
    lines, seen = [], set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = _parse_line(raw, number, endpoint, len(lines))
        if line.custom_id in seen:
            raise BatchFileError(f"custom_id {line.custom_id!r} is used twice; each request "
                                 "needs its own", number, "custom_id")
        seen.add(line.custom_id)
        lines.append(line)
        if len(lines) > max_lines:
            raise BatchFileError(f"a batch holds at most {max_lines} requests", number)
    if not lines:
        raise BatchFileError("the input file holds no requests")
    return lines


def _parse_line(raw: str, number: int, endpoint: str, index: int) -> Line:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BatchFileError(f"not valid JSON ({e.msg}, column {e.colno})", number) from None
    if not isinstance(obj, dict):
        raise BatchFileError("a request must be a JSON object", number)
    for name, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
        if not isinstance(obj.get(name), kind):
            what = "an object" if kind is dict else "a string"
            raise BatchFileError(f"{name!r} must be {what}", number, name)
    if unknown := sorted(set(obj) - {"custom_id", "method", "url", "body"}):
        raise BatchFileError(f"unknown field(s) {', '.join(map(repr, unknown))}", number, unknown[0])
    if obj["method"] != "POST":
        raise BatchFileError(f"method must be 'POST', got {obj['method']!r}", number, "method")
    if obj["url"] != endpoint:
        raise BatchFileError(f"url {obj['url']!r} is not the batch's endpoint {endpoint!r}",
                             number, "url")
    if not 0 < len(obj["custom_id"]) <= MAX_CUSTOM_ID_CHARS:
        raise BatchFileError(f"custom_id must be 1 to {MAX_CUSTOM_ID_CHARS} characters", number,
                             "custom_id")
    if obj["body"].get("stream"):
        raise BatchFileError("a batch request cannot stream ('stream': true)", number, "body.stream")
    return Line(index, obj["custom_id"], obj["url"], obj["body"])
