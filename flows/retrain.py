"""The ``retrain`` flow (deployment ``retrain/retrain``): the whole pipeline through the ``pipeline`` flow when
enough accepted feedback is new since the champion's data, else a finished run that says why not."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.artifacts import publish_summary
from flows.dvc_pipeline import PARAMS_FILE, pipeline
from pipeline.config import PROJECT_ROOT, load_settings
from pipeline.retraining import retrain_decision


@flow(name="retrain", log_prints=True)
def retrain(
    dataset: str | None = None,
    profile: str | None = None,
    set_params: dict[str, Any] | None = None,
    min_new: int | None = None,
    stream_to_log: bool = True,
) -> dict[str, Any]:
    """Run the pipeline (``dvc exp run``: collect exports the feedback, the registry decides the champion)
    when at least ``min_new`` (default ``feedback.min_new``) accepted items are new since the champion's data."""
    logger = get_run_logger()
    settings = load_settings(PROJECT_ROOT / PARAMS_FILE)
    if dataset is not None:
        settings = settings.with_overrides({"data.dataset": dataset})
    decision = retrain_decision(settings, min_new)
    logger.info("%s", decision["why"])
    if not decision["retrain"]:
        publish_summary([decision["why"]])
        return decision
    result = pipeline(dataset=dataset, profile=profile, set_params=set_params, stream_to_log=stream_to_log)
    return {**decision, "pipeline": result}
