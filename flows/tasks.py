"""Prefect tasks: one per pipeline stage, each a thin call into ``pipeline``.

Tasks never cache (every stage has side effects and DVC decides what needs to run). The download task
gets Prefect retries from ``data.download`` for unexpected failures; network errors are already retried per
file inside ``pipeline.data``.
Progress of long tasks reaches the run's log through the ``pipeline`` logger, which prefect.toml attaches
to Prefect logging (``logging.extra_loggers``).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import Settings

STAGES = ("download", "prepare", "tune", "train", "evaluate", "register", "package")


@task(name="download", cache_policy=NO_CACHE)
def download(settings: Settings) -> str:
    from pipeline import data

    logger = get_run_logger()
    logger.info("fetching %s into %s", settings.data.dataset, settings.path("raw"))
    folder = data.fetch_raw(settings)
    logger.info("raw files ready in %s", folder)
    return str(folder)


def _retry_unless_data_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry unexpected failures only. A ``DataError`` is final: ``pipeline.data`` already retried the
    network with back-off, and a wrong checksum, a 404 or a malformed local folder cannot heal by itself."""
    from pipeline.data import DataError

    return not isinstance(state.data, DataError)


def download_with_retries(settings: Settings) -> Any:
    """The download task with Prefect retries/back-off from ``data.download``."""
    return download.with_options(
        retries=settings.data.download.retries,
        retry_delay_seconds=settings.data.download.backoff_s,
        retry_condition_fn=_retry_unless_data_error,
    )


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(settings: Settings) -> dict[str, Any]:
    from pipeline import data

    summary = data.prepare(settings)
    get_run_logger().info("prepared: %s", summary)
    return summary


@task(name="tune", cache_policy=NO_CACHE)
def tune(settings: Settings, workers: int | None = None) -> dict[str, Any]:
    from pipeline import tune as tuning

    summary = tuning.run(settings, workers)
    get_run_logger().info(
        "study %s: %s complete, %s pruned, %s failed; best params %s",
        summary["study_name"], summary["trials_complete"], summary["trials_pruned"],
        summary["trials_failed"], summary["best_params"],
    )
    return summary


@task(name="train", cache_policy=NO_CACHE)
def train(settings: Settings) -> dict[str, Any]:
    from pipeline import train as training
    from pipeline import tune as tuning

    tuned = tuning.apply_best_params(settings)  # models/best_params.yaml, a DVC dependency of train
    result = training.run(tuned)
    get_run_logger().info("trained: %s", result)
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(settings: Settings) -> dict[str, Any]:
    from pipeline import evaluate as evaluation

    metrics = evaluation.run(settings)
    get_run_logger().info("test metrics: %s", metrics)
    return metrics


@task(name="register", cache_policy=NO_CACHE)
def register(settings: Settings) -> dict[str, Any]:
    from pipeline import registry

    record = registry.run(settings)
    get_run_logger().info("registry: %s", record)
    return record


@task(name="package", cache_policy=NO_CACHE)
def package(settings: Settings) -> str:
    from pipeline import bento

    tag = bento.import_champion(settings)
    get_run_logger().info("BentoML model %s", tag)
    return tag


def run_stage(name: str, settings: Settings, workers: int | None = None) -> Any:
    """Run one stage's task inside the current flow."""
    if name == "download":
        return download_with_retries(settings)(settings)
    if name == "tune":
        return tune(settings, workers)
    tasks = {"prepare": prepare, "train": train, "evaluate": evaluate, "register": register, "package": package}
    if name not in tasks:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return tasks[name](settings)
