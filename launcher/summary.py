"""The lines ``make run`` ends with, read only from files a run leaves (so it works after ``dvc pull``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PROJECT_ROOT

PARAMS_FILE = "params.yaml"
EVAL_METRICS = "eval/metrics.json"
REGISTRY_REPORT = "registry.json"
BENTO_REPORT = "bento_model.json"
DATA_SUMMARY = "data/summary.json"  # the prepare stage's: n_feedback, the feedback items in the train split
DEFAULT_PREFECT_UI = "http://127.0.0.1:4200"
MLFLOW_UI = "http://127.0.0.1:5000"  # make mlflow-ui
TRAIN_RUN = "train_run.json"  # under paths.models: the training run's experiment
# MLflow 3.17's UI opens an experiment in the view of its global GenAI / Model training switch (GenAI until
# a user flips it) whatever the experiment's mlflow.experimentKind tag says; this query parameter picks it.
TRAINING_VIEW = "workflowType=machine_learning"
SERVE_URL = "http://127.0.0.1:3000"  # make serve
LABEL_WIDTH = 24


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _line(label: str, text: str) -> str:
    return f"  {label:<{LABEL_WIDTH}}{text}"


def mlflow_ui_url(project_dir: Path = PROJECT_ROOT, base: str = MLFLOW_UI) -> str:
    """The experiment's page in MLflow's training view (from models/train_run.json; the experiment list
    before the first training run)."""
    params = yaml.safe_load((project_dir / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    record = _read_json(project_dir / params.get("paths", {}).get("models", "models") / TRAIN_RUN)
    if record and record.get("experiment_id"):
        return f"{base}/#/experiments/{record['experiment_id']}?{TRAINING_VIEW}"
    return f"{base}/#/experiments?{TRAINING_VIEW}"


def summary_lines(project_dir: Path = PROJECT_ROOT, prefect_ui: str = DEFAULT_PREFECT_UI) -> list[str]:
    """The run's summary; a missing report becomes a line saying which stage did not write it."""
    params = yaml.safe_load((project_dir / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    reports = project_dir / params.get("paths", {}).get("reports", "reports")
    metrics = _read_json(reports / EVAL_METRICS)
    registry = _read_json(reports / REGISTRY_REPORT)
    bento = _read_json(reports / BENTO_REPORT)

    lines = ["", "Run summary", _line("dataset", str(params.get("data", {}).get("dataset"))),
             _line("profile", str(params.get("profile")))]
    data_summary = _read_json(reports / DATA_SUMMARY)
    if data_summary and data_summary.get("n_feedback"):  # said only when the service's corrections were used
        accept = params.get("feedback", {}).get("accept")
        lines.append(_line("feedback in training", f"{data_summary['n_feedback']} items (feedback.accept={accept}; "
                                                   "review: python -m pipeline.stages.collect review)"))
    if metrics:
        lines.append(_line("test balanced accuracy",
                           f"{metrics['test_balanced_accuracy']:.4f}  (accuracy {metrics['test_accuracy']:.4f}, "
                           f"{metrics['n_test']} test images)"))
        lines += _trust_lines(metrics)
    else:
        lines.append(_line("test balanced accuracy", f"none yet ({reports / EVAL_METRICS} missing: evaluate "
                                                     "has not run)"))
    if registry:
        model = f"{registry['model_name']} version {registry['version']}"
        lines.append(_line("registered model", f"{model} (alias {registry['alias']})"))
        why = registry["reason"]
        if registry["decision"] != "champion" and registry.get("champion_version"):
            why += f"; the champion stays version {registry['champion_version']}"
        lines.append(_line("because", why))
    else:
        lines.append(_line("registered model", "none (register has not run)"))
    if bento:
        lines.append(_line("serve the champion", f"make serve       -> {SERVE_URL} (page at /, POST /predict)"))
        lines.append(_line("its BentoML model", str(bento.get("tag"))))
    else:
        lines.append(_line("serve the champion", "nothing packaged yet (package has not run)"))
    lines += [
        _line("runs, trials, registry", f"make mlflow-ui   -> {mlflow_ui_url(project_dir)}"),
        _line("flow runs", f"make prefect-ui  -> {prefect_ui}"),
        _line("all metrics and plots", "dvc metrics show / dvc plots show"),
    ]
    return lines


def _trust_lines(metrics: dict[str, Any]) -> list[str]:
    """One line: calibration error, the share answered "confident" and the weakest "not a kana" separation."""
    if "test_ece" not in metrics:
        return []
    text = f"ECE {metrics['test_ece']:.4f} (before {metrics['test_ece_uncalibrated']:.4f})"
    if "test_coverage_at_target" in metrics:
        text += (f"; confident on {metrics['test_coverage_at_target']:.1%} "
                 f"({metrics.get('test_answered_accuracy', float('nan')):.2%} right)")
    aurocs = [value for key, value in metrics.items() if key.startswith("ood_auroc_")]
    if aurocs:
        text += f"; not-a-kana AUROC min {min(aurocs):.3f}"
    return [_line("trust", text)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-api", default=None,
                        help="the Prefect API URL the run used (its UI is shown); default the local server")
    parser.add_argument("--mlflow-url", action="store_true", help="print only the MLflow UI address to open")
    args = parser.parse_args(argv)
    if args.mlflow_url:
        print(mlflow_ui_url())
        return 0
    ui = args.prefect_api.removesuffix("/").removesuffix("/api") if args.prefect_api else DEFAULT_PREFECT_UI
    print("\n".join(summary_lines(prefect_ui=ui)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
