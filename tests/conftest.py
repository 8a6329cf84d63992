"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Settings, load_settings
from tests.support import PROJECT_ROOT


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one torch thread, restoring the previous count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings rooted in a temp dir: the project's params.yaml with a profile and dotted overrides.

    Every output path (data, models, reports, mlflow, optuna) then lands under ``tmp_path``.
    """

    def _make(overrides: dict[str, Any] | None = None, profile: str = "quick") -> Settings:
        params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
        params["profile"] = profile
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        return load_settings(path, overrides)

    return _make
