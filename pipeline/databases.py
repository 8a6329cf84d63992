"""Database URLs as guides write them, mapped to the pinned driver (psycopg 3), and the one rule that MLflow
and the Optuna study never share a database (each owns its schema and alembic history)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

PINNED_POSTGRES = "postgresql+psycopg"  # psycopg 3: what requirements.lock installs
# Forms copied from guides: the psycopg2 driver (not installed) and the old Heroku-style scheme.
POSTGRES_ALIASES = ("postgresql+psycopg2", "postgres", "postgres+psycopg2")
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class DatabaseUrlError(ValueError):
    """A database URL that cannot work; the message gives the form that does."""


def with_pinned_driver(url: str) -> str:
    """``url`` with a PostgreSQL scheme of a guide (``postgresql+psycopg2://``, ``postgres://``) rewritten to
    the pinned psycopg 3 driver (``postgresql+psycopg://``); any other URL unchanged."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in POSTGRES_ALIASES:
        return f"{PINNED_POSTGRES}://{rest}"
    return url


def database_identity(url: str) -> tuple[str, str, int | None, str] | None:
    """(dialect, host, port, database) of an RDB URL (a SQLite file: its path), or None for tracking servers,
    journal files and in-memory stores."""
    parts = urlsplit(with_pinned_driver(url))
    dialect = parts.scheme.split("+")[0].lower()
    if dialect == "sqlite":
        path = url.partition("://")[2].removeprefix("/")
        return (dialect, "", None, str(Path(path).resolve())) if path and ":memory:" not in path else None
    if dialect not in DEFAULT_PORTS or not parts.path.strip("/"):
        return None
    host = (parts.hostname or "localhost").lower()
    host = "localhost" if host in ("127.0.0.1", "::1") else host
    return dialect, host, parts.port or DEFAULT_PORTS[dialect], parts.path.strip("/")


def check_separate(mlflow_uri: str, optuna_url: str | None) -> None:
    """Refuse MLflow's tracking database and the Optuna storage being one database: both keep an
    ``alembic_version`` table, and the second to arrive fails deep in a migration."""
    if not optuna_url:
        return
    mlflow_db, optuna_db = database_identity(mlflow_uri), database_identity(optuna_url)
    if mlflow_db is not None and mlflow_db == optuna_db:
        dialect, host, port, name = mlflow_db
        where = f"SQLite file {name}" if dialect == "sqlite" else f"database {name!r} on {host}:{port} ({dialect})"
        example = ("sqlite:////path/to/optuna.db" if dialect == "sqlite"
                   else f"{PINNED_POSTGRES}://USER@{host}:{port}/optuna (after e.g. `createdb optuna`)")
        raise DatabaseUrlError(
            f"MLFLOW_TRACKING_URI and tune.storage point at the same {where}. MLflow and Optuna each need a "
            f"database of their own (both manage their schema with alembic): set tune.storage to another one, "
            f"e.g. {example}, or leave it empty for the journal file under paths.optuna."
        )
