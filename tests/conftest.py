"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, load_settings, write_params


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread, restoring the previous count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def served_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real `bentoml serve` of the tiny model for every test that only talks HTTP to it (service, page):
    trained, stored and started once per session. One worker, so a test of the per-worker limits is exact."""
    from tests.served_model import SHARED_FEEDBACK, SHARED_LIMITS, serve_tiny_model

    with serve_tiny_model(tmp_path_factory.mktemp("served"), SHARED_LIMITS, workers=1,
                          feedback_overrides=SHARED_FEEDBACK) as served:
        yield served


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings rooted in a temp dir: conf/ composed with a profile, then dotted overrides.

    Every output path (data, models, reports, mlflow, optuna) then lands under ``tmp_path``.
    """

    def _make(overrides: dict[str, Any] | None = None, profile: str = "quick") -> Settings:
        path = write_params(tmp_path / "params.yaml", {"profile": profile})
        settings = load_settings(path)
        return settings.with_overrides(overrides) if overrides else settings

    return _make


# The longest test modules (measured, README "Tests"), started first: under `make test`'s pytest-xdist
# workers each module runs whole on one worker, and the longest first keeps the two workers level.
LONGEST_FIRST = ("test_real_data.py", "test_pipeline_e2e.py", "test_deployment.py", "test_container.py",
                 "test_scaleout.py", "test_page.py", "test_tune.py", "test_service.py", "test_flows.py",
                 "test_hotswap.py", "test_feedback_store.py", "test_retrain.py", "test_first_run.py",
                 "test_registry.py", "test_train.py", "test_feedback_service.py", "test_page_feedback.py")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, give each worker its share of the cores: torch threads and what subprocesses inherit."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture
def bento_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real, empty BentoML model store in ``tmp_path`` for this test (the user's store is untouched)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    path = tmp_path / "bentoml-models"
    path.mkdir()
    BentoMLContainer.model_store.set(ModelStore(str(path)))
    try:
        yield path
    finally:
        BentoMLContainer.model_store.reset()
