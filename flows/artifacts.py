"""What each stage leaves on its Prefect flow run: tables of its metrics (the tuning leaderboard), the
registry decision, a link to the MLflow run; and the run summary on the pipeline's parent run."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from pipeline.config import Settings

log = logging.getLogger(__name__)

LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # make mlflow-ui
LEADERBOARD_ROWS = 10
SUMMARY_KEY = "run-summary"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server itself, else on ``make mlflow-ui`` over the local store."""
    base = tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else LOCAL_MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _table(rows: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": key, "value": value} for key, value in rows.items()
            if isinstance(value, int | float | str | bool) or value is None]


def _train(settings: Settings, result: Mapping[str, Any]) -> None:
    keys = ("best_val_balanced_accuracy", "best_val_accuracy", "best_epoch", "epochs_run", "model_epochs",
            "n_train", "n_val", "device", "train_seconds")
    create_table_artifact(_table({key: result.get(key) for key in keys}), key="train-metrics",
                          description=f"train · {settings.data.dataset} · {settings.profile}")
    _mlflow_link(result, "the training run (test metrics added by evaluate)")


def _evaluate(settings: Settings, result: Mapping[str, Any]) -> None:
    create_table_artifact(_table({key: value for key, value in result.items() if key.startswith(("test_", "n_"))}),
                          key="test-metrics", description=f"evaluate · {settings.data.dataset} (official test split)")


def _tune(settings: Settings, result: Mapping[str, Any]) -> None:
    path = settings.path("reports") / "tune" / "trials.csv"
    if not path.is_file():
        return
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("value")]
    rows.sort(key=lambda row: float(row["value"]), reverse=True)
    if rows:
        create_table_artifact(rows[:LEADERBOARD_ROWS], key="tuning-leaderboard",
                              description=f"best {min(len(rows), LEADERBOARD_ROWS)} complete trials of study "
                                          f"{result.get('study_name')} (validation balanced accuracy)")


def _register(settings: Settings, result: Mapping[str, Any]) -> None:
    metrics = result.get("metrics") or {}
    lines = [f"## {result.get('model_name')} version {result.get('version')}: **{result.get('decision')}**", "",
             str(result.get("reason")), "",
             f"- alias `{result.get('alias')}`; champion is version {result.get('champion_version')}",
             *(f"- {key}: {value:.4f}" for key, value in metrics.items())]
    create_markdown_artifact("\n".join(lines), key="registry-decision", description="register")


def _package(settings: Settings, result: Any) -> None:
    create_markdown_artifact(f"BentoML model `{result}` holds the champion of "
                             f"`{settings.registered_model_name()}`: `make serve` serves it.",
                             key="bento-model", description="package")


def _mlflow_link(result: Mapping[str, Any], text: str) -> None:
    if result.get("run_id") and result.get("experiment_id"):
        url = mlflow_run_url(str(result.get("tracking_uri") or ""), str(result["experiment_id"]), str(result["run_id"]))
        create_link_artifact(url, link_text=f"MLflow: {text}", key="mlflow-run",
                             description="needs `make mlflow-ui` for a local store")


PUBLISHERS: dict[str, Callable[[Settings, Any], None]] = {
    "tune": _tune, "train": _train, "evaluate": _evaluate, "register": _register, "package": _package,
}


def publish(stage: str, settings: Settings, result: Any) -> None:
    """Leave the stage's artifacts on the current flow run; never fail the stage over them."""
    publisher = PUBLISHERS.get(stage)
    if publisher is None or result is None:
        return
    try:
        publisher(settings, result)
    except Exception:
        log.warning("could not create the Prefect artifacts of stage %s", stage, exc_info=True)


def publish_summary(lines: list[str]) -> None:
    """The pipeline run's closing summary (``launcher.summary``) as a markdown artifact."""
    try:
        create_markdown_artifact("```\n" + "\n".join(lines).strip("\n") + "\n```", key=SUMMARY_KEY,
                                 description="make run / pipeline deployment: the run summary")
    except Exception:
        log.warning("could not create the Prefect run summary artifact", exc_info=True)
