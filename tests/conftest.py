"""Fixtures shared by every test package."""

from __future__ import annotations

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
    from tests.served_model import SHARED_LIMITS, serve_tiny_model

    with serve_tiny_model(tmp_path_factory.mktemp("served"), SHARED_LIMITS, workers=1) as served:
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
