"""Prefect flows over the stage table: ``stage`` (one DVC stage) and ``tune`` (the shared-study deployment).
Settings are loaded inside each flow from params.yaml, so flow parameters stay plain JSON."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, tags

from flows import tasks
from pipeline.config import Settings, load_settings
from pipeline.profiles import cpu_time_note

# Set by the pipeline flow for the DVC subprocesses, so stage runs are tagged with the run that drove them.
PARENT_RUN_ENV = "KUZUSHIJI_PIPELINE_FLOW_RUN"
# Stages whose cost grows with the profile's epochs and data: on a CPU they say how long they will take.
TIMED_STAGES = ("tune", "train")


def _settings(params_path: str | None) -> Settings:
    settings = load_settings(params_path)
    get_run_logger().info("settings: profile=%s dataset=%s root=%s", settings.profile,
                          settings.data.dataset, settings.root)
    return settings


def _announce_cpu_time(name: str, settings: Settings) -> None:
    if name in TIMED_STAGES and (note := cpu_time_note(name, settings)):
        get_run_logger().warning("%s", note)


@flow(name="stage", flow_run_name="{name}", log_prints=True)
def stage(name: str, params_path: str | None = None, workers: int | None = None) -> Any:
    """One pipeline stage as a flow run."""
    if name not in tasks.STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(tasks.STAGES)}")
    settings = _settings(params_path)
    _announce_cpu_time(name, settings)
    return tasks.run_stage(name, settings, workers)


@flow(name="tune", log_prints=True)
def tune(params_path: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Add trials to the study of the current params until it holds ``tune.n_trials`` finished trials
    (prepared data must exist). Outside DVC: ``dvc repro`` afterwards records the result."""
    settings = _settings(params_path)
    _announce_cpu_time("tune", settings)
    return tasks.run_stage("tune", settings, workers)


def run_stage_cli(name: str, workers: int | None = None) -> Any:
    """Entry point of ``python -m flows <stage>``: the stage flow, tagged with the driving pipeline run."""
    parent = os.environ.get(PARENT_RUN_ENV)
    with tags(*(["dvc", f"pipeline-run:{parent}"] if parent else ["dvc"])):
        return stage(name=name, workers=workers)
