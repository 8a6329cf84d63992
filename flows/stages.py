"""Prefect flows over the stage table: one flow per DVC stage, named after it, and ``tune`` (the shared-study
deployment). Settings are loaded inside each flow from params.yaml, so flow parameters stay plain JSON."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from prefect import Flow, Task, flow, get_client, get_run_logger, tags
from prefect.flow_engine import run_flow
from prefect.states import Completed, Failed, Pending, Running

from flows import artifacts, tasks
from pipeline.config import Settings, load_settings
from pipeline.profiles import cpu_time_note

log = logging.getLogger(__name__)

# Set by the pipeline flow for the DVC subprocesses: the flow run the stage runs appear beneath.
PARENT_RUN_ENV = "KUZUSHIJI_PIPELINE_FLOW_RUN"
# Stages whose cost grows with the profile's epochs and data: on a CPU they say how long they will take.
TIMED_STAGES = ("tune", "train")
DVC_TAG = "dvc"
PARENT_TAG_PREFIX = "pipeline-run:"


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
    """One pipeline stage as a flow run (run through :func:`stage_flow`, which names the flow after it)."""
    if name not in tasks.STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(tasks.STAGES)}")
    settings = _settings(params_path)
    _announce_cpu_time(name, settings)
    result = tasks.run_stage(name, settings, workers)
    artifacts.publish(name, settings, result)
    return result


def stage_flow(name: str) -> Flow[..., Any]:
    """The flow of one stage, named after it: the Prefect UI lists ``train``, ``tune`` ... as flows."""
    if name not in tasks.STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(tasks.STAGES)}")
    return stage.with_options(name=name)


@flow(name="tune", log_prints=True)
def tune(params_path: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Add trials to the study of the current params until it holds ``tune.n_trials`` finished trials
    (prepared data must exist). Outside DVC: ``dvc repro`` afterwards records the result."""
    settings = _settings(params_path)
    _announce_cpu_time("tune", settings)
    result = tasks.run_stage("tune", settings, workers)
    artifacts.publish("tune", settings, result)
    return result


def run_stage_cli(name: str, workers: int | None = None) -> Any:
    """Entry point of ``python -m flows <stage>``: the stage's flow run, beneath the pipeline run that drove
    DVC (``$KUZUSHIJI_PIPELINE_FLOW_RUN``) when there is one, and tagged with it."""
    parent = os.environ.get(PARENT_RUN_ENV, "").strip()
    run_tags = [DVC_TAG, *([f"{PARENT_TAG_PREFIX}{parent}"] if parent else [])]
    chosen = stage_flow(name)
    parameters = {"name": name, "workers": workers}
    with tags(*run_tags):
        if parent:
            return run_as_subflow(chosen, parameters, parent, run_tags)
        return chosen(**parameters)


def run_as_subflow(child: Flow[..., Any], parameters: dict[str, Any], parent: str, run_tags: list[str]) -> Any:
    """Run ``child`` in this process as a subflow of flow run ``parent`` (another process: DVC runs each
    stage). What Prefect does for an in-process subflow, done through the API: a task run in the parent
    stands for the child, and the child's flow run points at it (``parent_task_run_id``)."""
    try:
        parent_id = uuid.UUID(parent)
        with get_client(sync_client=True) as client:
            tracker = client.create_task_run(
                Task(name=child.name, fn=child.fn), flow_run_id=parent_id,
                dynamic_key=f"{child.name}-{uuid.uuid4().hex[:8]}", name=child.name, extra_tags=run_tags,
                state=Running())
            flow_run = client.create_flow_run(child, name=child.name, tags=run_tags, state=Pending(),
                                              parameters=child.serialize_parameters(parameters),
                                              parent_task_run_id=tracker.id)
    except Exception as exc:  # a parent id from elsewhere: the stage still runs, tagged only
        log.warning("flow run %s cannot be this stage's parent (%s): running it tagged only", parent, exc)
        return child(**parameters)
    try:
        result = run_flow(child, flow_run=flow_run, parameters=parameters)
    except BaseException as exc:
        _finish(tracker.id, Failed(message=f"stage {child.name} failed: {type(exc).__name__}: {exc}"[:2000]))
        raise
    _finish(tracker.id, Completed())
    return result


def _finish(task_run_id: uuid.UUID, state: Any) -> None:
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, state, force=True)
    except Exception:
        log.warning("could not set the state of the parent's task run %s", task_run_id, exc_info=True)
