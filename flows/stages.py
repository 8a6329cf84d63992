"""Prefect flows over the stage tasks.

``stage`` runs one DVC stage (``python -m flows <stage>`` is each stage's command in dvc.yaml).
``preprocess``, ``tune`` and ``train`` group stages for direct use without DVC (e.g. a tuning deployment
that adds workers to a shared study). Settings are loaded inside each flow from params.yaml
(``$KUZUSHIJI_PARAMS`` or ``params_path``) so flow parameters stay plain JSON.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, tags

from flows import tasks
from pipeline.config import load_settings

# Set by the pipeline flow for the DVC subprocesses, so stage runs are tagged with the run that drove them.
PARENT_RUN_ENV = "KUZUSHIJI_PIPELINE_FLOW_RUN"


def _settings(params_path: str | None, overrides: dict[str, Any] | None) -> Any:
    settings = load_settings(params_path, overrides)
    get_run_logger().info("settings: profile=%s dataset=%s root=%s", settings.profile,
                          settings.data.dataset, settings.root)
    return settings


@flow(name="stage", flow_run_name="{name}", log_prints=True)
def stage(name: str, params_path: str | None = None, workers: int | None = None) -> Any:
    """One pipeline stage as a flow run."""
    if name not in tasks.STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(tasks.STAGES)}")
    return tasks.run_stage(name, _settings(params_path, None), workers)


@flow(name="preprocess", log_prints=True)
def preprocess(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Download (with retries) and prepare the data."""
    settings = _settings(params_path, overrides)
    tasks.run_stage("download", settings)
    return tasks.prepare(settings)


@flow(name="tune", log_prints=True)
def tune(
    params_path: str | None = None, workers: int | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run or resume the Optuna study (prepared data must exist)."""
    return tasks.tune(_settings(params_path, overrides), workers)


@flow(name="train", log_prints=True)
def train(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate, register, package: a failure stops before the next step, so a model that failed
    evaluation is never registered and an unregistered model is never packaged."""
    settings = _settings(params_path, overrides)
    trained = tasks.train(settings)
    metrics = tasks.evaluate(settings)
    record = tasks.register(settings)
    bento_tag = tasks.package(settings)
    return {"train": trained, "evaluate": metrics, "register": record, "bento_model": bento_tag}


def run_stage_cli(name: str, workers: int | None = None) -> Any:
    """Entry point of ``python -m flows <stage>``: the stage flow, tagged with the driving pipeline run."""
    parent = os.environ.get(PARENT_RUN_ENV)
    with tags(*(["dvc", f"pipeline-run:{parent}"] if parent else ["dvc"])):
        return stage(name=name, workers=workers)
