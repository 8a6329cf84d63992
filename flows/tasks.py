"""The stages as a table, stage name -> the ``pipeline.stages`` function run as one Prefect task; the order
of the stages is dvc.yaml's alone. Tasks never cache (DVC decides what runs); only the download retries."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import Settings


@dataclass(frozen=True)
class StageFunction:
    """Where a stage's work lives: ``module:function``, called with the run's Settings."""

    target: str
    takes_workers: bool = False  # the tune stage: parallel worker processes on one study
    retried: bool = False  # Prefect retries from data.download (a network stage)

    def resolve(self) -> Callable[..., Any]:
        # Imported when the stage runs: `python -m flows download` must not pay for torch.
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


STAGE_FUNCTIONS: dict[str, StageFunction] = {
    "download": StageFunction("pipeline.stages.download:run", retried=True),
    "collect": StageFunction("pipeline.stages.collect:run"),
    "prepare": StageFunction("pipeline.stages.prepare:run"),
    "tune": StageFunction("pipeline.stages.tune:run", takes_workers=True),
    # Tuned values (models/best_params.yaml) are the train stage's own input, applied inside its `run`.
    "train": StageFunction("pipeline.stages.train:run"),
    "evaluate": StageFunction("pipeline.stages.evaluate:run"),
    "register": StageFunction("pipeline.stages.register:run"),
    "package": StageFunction("pipeline.stages.package:import_champion"),
}
STAGES = tuple(STAGE_FUNCTIONS)


def _retry_unless_data_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry unexpected failures only. A ``DataError`` is final: ``pipeline.download`` already retried the
    network with back-off, and a wrong checksum, a 404 or a malformed local folder cannot heal by itself."""
    from pipeline.contract import DataError

    return not isinstance(state.data, DataError)


@task(cache_policy=NO_CACHE)
def _call_stage_function(name: str, settings: Settings, workers: int | None = None) -> Any:
    stage = STAGE_FUNCTIONS[name]
    kwargs = {"workers": workers} if stage.takes_workers else {}
    result = stage.resolve()(settings, **kwargs)
    get_run_logger().info("%s: %s", name, result)
    return result


def stage_task(name: str, settings: Settings) -> Any:
    """The Prefect task of one stage, named after it (task runs read ``download-…``, ``train-…``)."""
    if name not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    options: dict[str, Any] = {"name": name}
    if STAGE_FUNCTIONS[name].retried:
        options.update(
            retries=settings.data.download.retries,
            retry_delay_seconds=settings.data.download.backoff_s,
            retry_condition_fn=_retry_unless_data_error,
        )
    return _call_stage_function.with_options(**options)


def run_stage(name: str, settings: Settings, workers: int | None = None) -> Any:
    """Run one stage's task inside the current flow."""
    return stage_task(name, settings)(name, settings, workers)
