"""A `conserve-bench serve` subprocess on a free loopback port, for `bench` and the tests.

Starts the server in its own process group, waits until `/health` answers, and stops it:
SIGTERM (the server drains), then SIGKILL to the whole group so that no engine process
outlives it. It never talks to the job API or the engine itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conserve_bench.errors import ConserveError
from conserve_bench.store.pgcluster import free_port


class ServerStartError(ConserveError):
    pass


class ServerProcess:
    """`serve` with `serve_args` (everything but --port). Example:

    with ServerProcess(["--policy", "priority", "--db", url], Path("logs")) as server:
        httpx.get(f"{server.url}/health")
    """

    def __init__(self, serve_args: list[str], log_dir: Path, ready_timeout_s: float = 400,
                 wait: bool = True, env: dict[str, str] | None = None):
        """Start the server; with `wait=False`, return at once (`wait_ready` before use).
        `env`: variables added to this process's environment for the server's."""
        self.port = free_port()
        self.ready_timeout_s, self._ready = ready_timeout_s, False
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "conserve_bench.cli", "serve", "--port", str(self.port), *serve_args]
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Return once `/health` answers; on a failed start, kill the group and raise."""
        try:
            self._ready = self._ready or self._poll_ready(self.ready_timeout_s)
        except BaseException:
            self.kill()
            raise

    def _poll_ready(self, timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with {self.proc.returncode} while starting; "
                                       f"see {self.log_path}: {self.log_tail(300)!r}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerStartError(f"server not ready after {timeout_s:.0f}s; see {self.log_path}")

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def signal(self, sig) -> int:
        """SIGTERM goes to the server process, as docker and Kubernetes send it; SIGKILL to
        the whole group, engine processes included, as a machine failure would."""
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        time.sleep(1)  # let vLLM's engine processes finish exiting
        return code

    def stop(self, timeout_s: float = 60) -> None:
        """Drain (SIGTERM), then make sure nothing of the group is left running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # NOTE: engine processes share the group
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
