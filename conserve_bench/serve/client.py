"""HTTP client of the job API of a running `conserve-bench serve`.

Returns the same JSON objects as the embedded functions, so the CLI prints both alike.
Server-side errors come back as the same typed `ConserveError`s, one line each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conserve_bench.errors import ConserveError, EngineUnavailableError, JobNotFoundError, JobStateError
from conserve_bench.store.states import ItemState, JobState


class ServerError(ConserveError):
    pass


class JobClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def submit(self, tasks: list[str], limit=None, num_fewshot=None, data_dir=None,
               gen_kwargs=None, samples=None, run_key: str | None = None) -> dict[str, Any]:
        """Queue a job; with a `run_key` the server holds already, its job is answered."""
        body = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
                "gen_kwargs": gen_kwargs or {}, "data_dir": data_dir, "samples": samples,
                "run_key": run_key}
        return self._call("POST", "/v1/jobs", json=body)

    def jobs(self, limit: int) -> dict[str, Any]:
        return self._call("GET", "/v1/jobs", params={"limit": limit})

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def results(self, job_id: str, full: bool = False) -> dict[str, Any]:
        """The results summary; `full`: everything stored, per-document table included."""
        return self._call("GET", f"/v1/jobs/{job_id}/results", params={"full": "true"} if full else None)

    def model(self) -> str:
        """The name of the model the server serves."""
        return self._call("GET", "/v1/models")["data"][0]["id"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def submit_requests(self, requests: list[dict[str, Any]], label: str = "lm-eval") -> dict[str, Any]:
        """Queue lm-eval requests (`{"kind", "args"}`); the job's JSON plus each request's key."""
        return self._call("POST", "/v1/jobs/requests", json={"requests": requests, "label": label})

    def item_results(self, job_id: str, page_size: int = 1000) -> dict[str, Any]:
        """Key -> result of every finished item of a job, fetched page by page."""
        results: dict[str, Any] = {}
        offset: int | None = 0
        while offset is not None:
            page = self._call("GET", f"/v1/jobs/{job_id}/items",
                              params={"offset": offset, "limit": page_size})
            results.update({i["key"]: i["result"] for i in page["items"] if i["state"] == ItemState.DONE})
            offset = page["next_offset"]
        return results

    def wait(self, job_id: str, on_progress: Callable[[int, int], None], poll_s: float = 1.0):
        while True:
            status = self.status(job_id)
            on_progress(status["done"], status["total"])
            if JobState(status["state"]).is_final:
                return status
            time.sleep(poll_s)

    def _call(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"cannot reach {self.base_url}: {e}") from None
        if response.status_code < 400:
            return response.json()
        raise _error(response)


def _error(response) -> ConserveError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 401:
        return ServerError("unauthorized: pass the server's key with --api-key")
    if response.status_code == 422:
        first = (body.get("detail") or [{}])[0]
        field = ".".join(str(p) for p in first.get("loc", [])[1:]) or "body"
        return ServerError(f"invalid job spec: {field}: {first.get('msg', 'invalid')}")
    message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else None
    if response.status_code >= 500:  # the server or its engine failed, not the request
        return EngineUnavailableError(f"{response.status_code} from the server: {message or 'no detail'}")
    cls = {404: JobNotFoundError, 409: JobStateError}.get(response.status_code, ServerError)
    return cls(message or f"server answered {response.status_code}")
