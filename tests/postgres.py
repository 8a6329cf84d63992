"""A real, throw-away PostgreSQL server for the scale-out tests, and fixtures around it.

The tests start their own server from the installed PostgreSQL binaries (Debian's ``postgresql`` package:
``/usr/lib/postgresql/<version>/bin``; elsewhere ``initdb`` on the PATH): a fresh data folder, password
authentication, listening on a free 127.0.0.1 port, stopped and deleted when the session ends. So
``make test`` needs no cluster set up by hand, no password in any file and leaves nothing running, and a
system cluster on port 5432 is neither needed nor touched. Each test creates and drops its own databases.

Without the binaries the tests are skipped with the command that installs them, except in CI
(``CI=true``), where ``.ci/run`` installs them and their absence is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import free_port, stop_group

SUPERUSER = "postgres"
# PostgreSQL refuses to run as root: under root the server runs as this system user (the Debian package
# creates it).
SYSTEM_USER = "postgres"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0
INSTALL_HINT = "apt-get install postgresql (Debian/Ubuntu; .ci/run does this in CI)"
# Durability is irrelevant for a server that lives for one test session; these make it start and write
# faster on a busy 2-core machine.
FAST_UNSAFE_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


@dataclass(frozen=True)
class PostgresServer:
    """A running server: connection facts and database management as the superuser."""

    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql", *, password: str | None = None) -> str:
        """SQLAlchemy URL of ``database``: ``postgresql`` (psycopg 3; MLflow, Optuna) or
        ``postgresql+asyncpg`` (Prefect). ``password`` overrides the real one (wrong-password tests)."""
        secret = quote(self.password if password is None else password, safe="")
        return f"{driver}://{self.user}:{secret}@{self.host}:{self.port}/{database}"

    def url_without_password(self, database: str) -> str:
        """URL for clients that take the password from libpq's ``PGPASSWORD`` instead."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def _execute(self, statement: str) -> None:
        # autocommit: CREATE/DROP DATABASE cannot run inside a transaction.
        with self._connect(autocommit=True) as connection:
            connection.execute(statement)

    def table_names(self, database: str) -> set[str]:
        """Tables of ``database`` (public schema): what a service really created there."""
        query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        with self._connect(database) as connection:
            return {row[0] for row in connection.execute(query).fetchall()}

    def _connect(self, database: str = "postgres", autocommit: bool = False) -> Any:
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database, connect_timeout=10, autocommit=autocommit)

    def create_database(self, name: str) -> str:
        self._execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE ends sessions a stopped server or worker left open.
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def database_names(self) -> set[str]:
        with self._connect() as connection:
            return {row[0] for row in connection.execute("SELECT datname FROM pg_database").fetchall()}


def find_bindir() -> Path | None:
    """Folder holding ``initdb`` and ``postgres``: the newest Debian version, else the PATH."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                    key=lambda path: int(Path(path).parent.parent.name) if Path(path).parent.parent.name
                    .isdigit() else 0)
    if debian:
        return Path(debian[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable(reason: str) -> None:
    """Skip outside CI; fail in CI, where PostgreSQL must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def _run_as() -> dict[str, object]:
    """Popen arguments that drop root to :data:`SYSTEM_USER` (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        unavailable(f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as "
                    f"({INSTALL_HINT} creates it)")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _give_to_server_user(path: Path, run_as: dict[str, object]) -> None:
    if run_as:
        os.chown(path, int(run_as["user"]), int(run_as["group"]))  # type: ignore[arg-type]


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """initdb + postgres on a free loopback port with a random superuser password; always stopped and
    its data folder deleted."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(f"PostgreSQL is not installed (no initdb found): {INSTALL_HINT}")
    run_as = _run_as()
    # Not pytest's tmp_path: that folder is private to the current user and the server may run as another.
    root = Path(tempfile.mkdtemp(prefix="kuzushiji-postgres-"))
    process: subprocess.Popen | None = None
    try:
        _give_to_server_user(root, run_as)
        password = secrets.token_urlsafe(16)
        password_file = root / "superuser-password"
        password_file.write_text(password + "\n", encoding="utf-8")
        _give_to_server_user(password_file, run_as)
        data = root / "data"
        log_path = root / "server.log"
        initdb = subprocess.run(
            [str(bindir / "initdb"), "--pgdata", str(data), "--username", SUPERUSER, "--pwfile",
             str(password_file), "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C",
             "--no-sync"],
            check=False, capture_output=True, text=True, timeout=START_TIMEOUT_S, **run_as,  # type: ignore[arg-type]
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout[-2000:]}\n{initdb.stderr[-2000:]}")
        port = free_port()
        settings = [arg for setting in FAST_UNSAFE_SETTINGS for arg in ("-c", setting)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(root), *settings],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **run_as,  # type: ignore[arg-type]
            )
        server = PostgresServer(host="127.0.0.1", port=port, user=SUPERUSER, password=password)
        _wait_until_accepting(server, process, log_path)
        yield server
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_accepting(server: PostgresServer, process: subprocess.Popen, log_path: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            psycopg.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                            dbname="postgres", connect_timeout=5).close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres did not accept connections in {START_TIMEOUT_S:.0f}s: {exc}\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}") from None
        time.sleep(0.3)


def _stop(process: subprocess.Popen) -> None:
    """SIGINT is PostgreSQL's fast shutdown: sessions are ended, the server exits cleanly."""
    stop_group(process, STOP_GRACE_S, signal.SIGINT)


def database_name(hint: str) -> str:
    """A unique, valid database name (PostgreSQL allows 63 bytes) derived from ``hint``."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in hint.lower()).strip("_")
    return f"t_{cleaned[:40]}_{secrets.token_hex(4)}"
