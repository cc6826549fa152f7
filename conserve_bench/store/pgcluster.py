"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

`initdb` + `pg_ctl` from the server binaries (`POSTGRES_BIN_DIRS`, or `pg_ctl` on PATH),
run as the `postgres` user when we are root (initdb refuses root), in a data directory
under a fresh temporary folder that user owns. Trust auth on 127.0.0.1 only; `remove()` (or
leaving the `with` block) stops it and deletes everything. It never touches a cluster it did not create.

    >>> with ThrowawayCluster() as pg:
    ...     store = Store(pg.create_database())
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

POSTGRES_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin",
                     "/usr/lib/postgresql/17/bin")
START_TIMEOUT_S = 60
# Tests trade durability across an OS crash for speed; a process kill or a restart of the
# server loses nothing either way (the WAL still reaches the OS before a commit returns).
FAST_SETTINGS = ("fsync=off", "full_page_writes=off")


class ClusterError(RuntimeError):
    """No PostgreSQL server could be found or started here."""


def find_bin_dir() -> Path:
    for folder in POSTGRES_BIN_DIRS:
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    if found := shutil.which("pg_ctl"):
        return Path(found).parent
    raise ClusterError(f"no PostgreSQL server binaries (initdb, pg_ctl) in {', '.join(POSTGRES_BIN_DIRS)} "
                       "or on PATH; install postgresql-15")


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayCluster:
    """One `postgres` server process with its own data directory, started on construction."""

    def __init__(self, durable: bool = False, max_connections: int = 200):
        self.bin_dir = find_bin_dir()
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.folder = Path(tempfile.mkdtemp(prefix="conserve-pg-"))
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "server.log"
        settings = [f"port={self.port}", "listen_addresses=127.0.0.1",
                    f"unix_socket_directories={self.folder}", f"max_connections={max_connections}",
                    *(() if durable else FAST_SETTINGS)]
        self._options = " ".join(f"-c {s}" for s in settings)
        try:
            self._give_folder_to_user()
            self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--no-instructions", *(() if durable else ("--no-sync",)))
            self.start()
        except BaseException:
            self.remove()
            raise

    def _give_folder_to_user(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        os.chmod(self.folder, 0o700)

    def _run(self, tool: str, *args: str) -> str:
        cmd = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                              cwd=self.folder)
        if done.returncode != 0:
            raise ClusterError(f"{tool} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o",
                  self._options, "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: clean; `immediate`: like a crash, recovered on start)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"t{uuid.uuid4().hex[:12]}"
        self._sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self._sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(statement)

    def remove(self) -> None:
        """Stop the server if it runs and delete its folder."""
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except (ClusterError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "ThrowawayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
