"""`conserve-bench batch`: an OpenAI batch file in, its responses out, as `vllm run-batch` does,
but durable and beside online traffic.

With `--server` the file goes to a running `serve` through its Batch API (`/v1/files`,
`/v1/batches`), which runs it in its idle time; without, a `serve` of this machine's model is
started on loopback for the run (`serve.process.ServerProcess`) on the store `--db`. Either way
the batch lives in the store: an interrupted run is followed again, and finished, with
`--batch-id`. The output file holds one line per request, in input order (the responses and
the errors, as `run-batch` writes them); `--errors` puts the errors in a file of their own,
as OpenAI's error file.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from conserve_bench.cli.base import ApiKeyOpt, DbOpt, DtypeOpt, Interrupted, JsonOpt, MaxModelLenOpt, ServerOpt, app, store_for
from conserve_bench.config import DEFAULT_MODEL
from conserve_bench.errors import ConserveError, JobStateError
from conserve_bench.output import out
from conserve_bench.serve.client import JobClient

POLL_S = 1.0
FINAL = ("completed", "expired", "cancelled", "failed")


class BatchInputError(ConserveError):
    pass


@app.command()
def batch(
    input_file: Annotated[Optional[Path], typer.Argument(metavar="INPUT.jsonl", help="OpenAI batch input (also vLLM run-batch's): one {custom_id, method, url, body} per line.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where the responses go, one line per request in input order.", show_default="INPUT.output.jsonl")] = None,
    errors: Annotated[Optional[Path], typer.Option("--errors", help="Put the error lines here instead of in --output (OpenAI's error file).")] = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    batch_id: Annotated[Optional[str], typer.Option("--batch-id", help="Follow (and finish) a batch created before instead of creating one.")] = None,
    completion_window: Annotated[str, typer.Option("--completion-window", help="Deliver what finished and expire the rest after this long (<n>h, <n>m, <n>s).")] = "24h",
    db: DbOpt = None,
    model: Annotated[str, typer.Option(help="Without --server: the model the started server serves.")] = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    max_model_len: MaxModelLenOpt = None,
    as_json: JsonOpt = False,
):
    """Run an OpenAI batch file: on a server (--server) in its idle time, or here. Example:
    batch requests.jsonl -o responses.jsonl"""
    if (input_file is None) == (batch_id is None):
        raise typer.BadParameter("give an input file, or --batch-id of a batch created before")
    content = endpoint = None
    if input_file is not None:
        content, endpoint = _read_input(input_file)
    output = output or (input_file.with_suffix(".output.jsonl") if input_file else Path(f"{batch_id}.output.jsonl"))
    if server:
        _run(JobClient(server, api_key), content, endpoint, input_file, batch_id, completion_window,
             output, errors, as_json, where=f"on {server}")
        return
    from conserve_bench.serve.process import ServerProcess

    store_for(db)  # NOTE: a bad store URL is one line here, not a server that fails to start
    key = secrets.token_urlsafe(24)
    args = ["--policy", "priority", "--no-profile", "--api-key", key, "--model", model, "--dtype", dtype,
            *(["--db", db] if db else []), *(["--max-model-len", str(max_model_len)] if max_model_len else [])]
    log_dir = output.parent if str(output.parent) else Path(".")
    out.stderr.print(f"starting a server of {model} for this batch (its log: {log_dir}/server-<port>.log)",
                     highlight=False)
    process = ServerProcess(args, log_dir)
    try:
        _run(JobClient(process.url, key), content, endpoint, input_file, batch_id, completion_window,
             output, errors, as_json, where="here")
    finally:
        process.stop()  # NOTE: SIGTERM: in-flight lines go back to pending for --batch-id


def _read_input(path: Path) -> tuple[bytes, str]:
    """The file's bytes and its endpoint (the first request's url; the server checks the rest)."""
    try:
        content = path.read_bytes()
    except OSError as e:
        raise BatchInputError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                url = json.loads(line).get("url")
            except (ValueError, AttributeError):
                raise BatchInputError(f"{path}: line {number} is not a JSON object") from None
            if not isinstance(url, str):
                raise BatchInputError(f"{path}: line {number} has no url")
            return content, url
    raise BatchInputError(f"{path} holds no requests")


def _run(client: JobClient, content: bytes | None, endpoint: str | None, input_file: Path | None,
         batch_id: str | None, window: str, output: Path, errors: Path | None, as_json: bool,
         where: str) -> None:
    if batch_id is None:
        uploaded = client.upload_file(content, input_file.name)
        found = client.create_batch(uploaded["id"], endpoint, window)
        batch_id = found["id"]
    if not as_json:
        out.stderr.print(f"batch [bold]{batch_id}[/] running {where} (follow it again with --batch-id {batch_id})")
    try:
        found = _follow(client, batch_id, as_json)
    except Interrupted:
        out.stderr.print(f"batch {batch_id} is kept; finish it with --batch-id {batch_id}")
        raise
    if found["status"] not in ("completed", "expired", "cancelled"):
        raise JobStateError(f"batch {batch_id} {found['status']}: {_first_error(found)}")
    num_out, num_err = _write(client, found, output, errors)
    if as_json:
        out.json({**found, "output_path": str(output), "errors_path": str(errors) if errors else None})
        return
    counts = found["request_counts"]
    out.stdout.print(f"batch {batch_id} {found['status']}: {counts['completed']} of {counts['total']} "
                     f"answered, {counts['failed']} failed; {num_out + (0 if errors else num_err)} lines "
                     f"in {output}" + (f", {num_err} in {errors}" if errors else ""), highlight=False)


def _follow(client: JobClient, batch_id: str, as_json: bool) -> dict[str, Any]:
    with out.progress(disable=as_json) as progress:
        task = progress.add_task(f"batch {batch_id}", total=None)
        while True:
            found = client.batch(batch_id)
            counts = found["request_counts"]
            progress.update(task, completed=counts["completed"] + counts["failed"], total=counts["total"])
            if found["status"] in FINAL:
                return found
            time.sleep(POLL_S)


def _first_error(found: dict[str, Any]) -> str:
    data = (found.get("errors") or {}).get("data") or []
    return data[0].get("message", "") if data else "no detail"


def _write(client: JobClient, found: dict[str, Any], output: Path, errors: Path | None) -> tuple[int, int]:
    """Write the batch's lines, in input order; (output lines, error lines)."""
    outputs = _lines(client, found.get("output_file_id"))
    failed = _lines(client, found.get("error_file_id"))
    order = {line_id: i for i, line_id in enumerate(_input_order(client, found))}
    merged = sorted(outputs + ([] if errors else failed), key=lambda line: order.get(line["custom_id"], len(order)))
    output.write_text("".join(json.dumps(line) + "\n" for line in merged))
    if errors:
        errors.write_text("".join(json.dumps(line) + "\n" for line in
                                  sorted(failed, key=lambda line: order.get(line["custom_id"], len(order)))))
    return len(outputs), len(failed)


def _lines(client: JobClient, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(line) for line in client.file_content(file_id).decode().splitlines() if line.strip()]


def _input_order(client: JobClient, found: dict[str, Any]) -> list[str]:
    content = client.file_content(found["input_file_id"]).decode()
    return [json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]
