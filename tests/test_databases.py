"""Database URLs copied from guides: psycopg2 forms mapped to the pinned psycopg 3 driver, and MLflow and
Optuna refused one shared database (pure functions; tests/test_scaleout.py runs a real PostgreSQL)."""

from __future__ import annotations

import pytest

from pipeline.databases import DatabaseUrlError, check_separate, database_identity, with_pinned_driver


@pytest.mark.parametrize(("given", "used"), [
    ("postgresql+psycopg2://u:p@db:5432/mlflow", "postgresql+psycopg://u:p@db:5432/mlflow"),
    ("postgres://u@db/optuna", "postgresql+psycopg://u@db/optuna"),
    ("postgresql://u@db/mlflow", "postgresql://u@db/mlflow"),  # SQLAlchemy's default is already psycopg 3
    ("postgresql+psycopg://u@db/mlflow", "postgresql+psycopg://u@db/mlflow"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://mlflow.internal:5000", "http://mlflow.internal:5000"),
])
def test_guide_urls_map_to_the_pinned_driver(given: str, used: str) -> None:
    assert with_pinned_driver(given) == used


def test_the_same_database_is_recognised_across_drivers_ports_and_loopback_names() -> None:
    assert database_identity("postgresql+psycopg2://a@127.0.0.1/db") == database_identity(
        "postgresql://b:secret@localhost:5432/db")
    assert database_identity("postgresql://a@db/one") != database_identity("postgresql://a@db/two")
    assert database_identity("sqlite:///:memory:") is None and database_identity("http://h:5000") is None


def test_mlflow_and_optuna_in_one_database_are_refused_with_the_fix() -> None:
    with pytest.raises(DatabaseUrlError) as error:
        check_separate("postgresql://mlflow@db:5432/shared", "postgresql+psycopg2://optuna@db/shared")
    message = str(error.value)
    assert "same database 'shared'" in message and "each need a database of their own" in message
    assert "postgresql+psycopg://USER@db:5432/optuna" in message
    with pytest.raises(DatabaseUrlError) as error:
        check_separate("postgresql://m:secret@db/shared", "postgresql://o:secret@db/shared")
    assert "secret" not in str(error.value)  # only host and name are echoed, never a password


def test_one_sqlite_file_for_both_is_refused(tmp_path) -> None:
    with pytest.raises(DatabaseUrlError, match="same SQLite file"):
        check_separate(f"sqlite:///{tmp_path}/both.db", f"sqlite:///{tmp_path}/./both.db")


def test_separate_databases_and_local_stores_pass() -> None:
    check_separate("postgresql://m@db/mlflow", "postgresql://o@db/optuna")
    check_separate("postgresql://m@db/mlflow", None)
    check_separate("sqlite:////tmp/a.db", "sqlite:////tmp/b.db")
    check_separate("http://mlflow:5000", "postgresql://o@db/optuna")
