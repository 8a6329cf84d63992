"""The evaluate stage: score the trained model once on the untouched official test split; balanced accuracy
leads because K49 is imbalanced and plain accuracy hides the rare characters."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from tqdm.auto import tqdm

from pipeline.config import Settings
from pipeline.contract import BUNDLE_FILE, TRAIN_RUN_FILE, TrainRun, Trust, softmax
from pipeline.files import atomic_path, write_json
from pipeline.trust.report import plot_trust, trust_metrics, write_curves

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
FIGURES_DIR = "figures"
METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FIGURE = "confusion_matrix.png"
RECALL_FIGURE = "per_class_recall.png"
WORST_FIGURE = "worst_errors.png"
# Artifact folders of the training run that the evaluation adds to.
EVAL_ARTIFACT = "eval"
FIGURES_ARTIFACT = "figures"
WORST_GRID_COLUMNS = 9
METRIC_DIGITS = 6  # rounding of the written metrics (DVC diffs stay readable)
# Tick-label font size in points: shrinks with the class count, kept readable (49 kana -> about 8 pt).
TICK_FONT_POINTS = (7.0, 12.0)
TICK_FONT_BUDGET = 400.0  # points shared by all tick labels along one axis
# Figure layout (inches): grows with the class count so 49 labels stay legible.
INCHES_PER_CLASS = 0.24
MARGIN_INCHES = 2.0
MIN_SIDE_INCHES = 5.0
COLORBAR_INCHES = 1.2
RECALL_HEIGHT_INCHES = 4.0


class EvaluationError(RuntimeError):
    """The stage's inputs do not fit together; the message says what to re-run."""


# ------------------------------------------------------------------------------------------- metrics


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (the project's headline metric)."""
    return float(skm.balanced_accuracy_score(y_true, y_pred))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(skm.accuracy_score(y_true, y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over all ``num_classes`` classes (a never-predicted class counts as 0)."""
    return float(skm.f1_score(y_true, y_pred, labels=np.arange(num_classes), average="macro",
                              zero_division=0))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def per_class_recall(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(recall, support) per class; recall is NaN for a class absent from ``y_true``."""
    matrix = confusion(y_true, y_pred, num_classes)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)
    return recall.astype(np.float64), support


def summarize(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float | int]:
    """The stage's headline numbers (keys as written to ``reports/eval/metrics.json``)."""
    return {
        "test_balanced_accuracy": round(balanced_accuracy(y_true, y_pred), METRIC_DIGITS),
        "test_accuracy": round(accuracy(y_true, y_pred), METRIC_DIGITS),
        "test_macro_f1": round(macro_f1(y_true, y_pred, num_classes), METRIC_DIGITS),
        "n_test": len(y_true),
    }


# ---------------------------------------------------------------------------------------- prediction


def predict(model: Any, images: np.ndarray, batch_size: int, device: Any) -> np.ndarray:
    """The model's logits (N, C), batch by batch for the bar (on a terminal; quiet in CI logs): K49's test
    set is minutes on a CPU, and each test-time view adds as much again."""
    from pipeline.training.bundle import predict_logits

    starts = range(0, len(images), batch_size)
    parts = []
    with tqdm(total=len(starts), desc="evaluate", unit="batch", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for start in starts:
            parts.append(predict_logits(model, images[start:start + batch_size], batch_size, device))
            bar.update()
    return np.concatenate(parts) if parts else predict_logits(model, images, batch_size, device)


# ------------------------------------------------------------------------------------------- figures


def plot_confusion(matrix: np.ndarray, chars: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix (recall on the diagonal) with the characters as tick labels."""
    from pipeline.figures import new_figure, save_figure

    count = len(chars)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(MIN_SIDE_INCHES, INCHES_PER_CLASS * count + MARGIN_INCHES)
    fig, ax = new_figure(side + COLORBAR_INCHES, side)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    font = _tick_font(count)
    ticks = np.arange(count)
    ax.set_xticks(ticks, labels=list(chars), fontproperties=font)
    ax.set_yticks(ticks, labels=list(chars), fontproperties=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Test confusion matrix (row-normalised)")
    return save_figure(fig, path)


def plot_per_class_recall(recall: np.ndarray, support: np.ndarray, chars: Sequence[str],
                          balanced: float, path: Path) -> Path:
    """Recall per class as bars (index order), with the balanced accuracy as a reference line."""
    from pipeline.figures import new_figure, save_figure

    count = len(chars)
    fig, ax = new_figure(max(MIN_SIDE_INCHES, INCHES_PER_CLASS * count + MARGIN_INCHES), RECALL_HEIGHT_INCHES)
    positions = np.arange(count)
    values = np.nan_to_num(recall, nan=0.0)
    colors = ["tab:red" if s == 0 else ("tab:orange" if v < balanced else "tab:blue")
              for v, s in zip(values, support, strict=True)]
    ax.bar(positions, values, color=colors)
    ax.axhline(balanced, color="black", linestyle="--", linewidth=1,
               label=f"balanced accuracy {balanced:.4f}")
    font = _tick_font(count)
    ax.set_xticks(positions, labels=list(chars), fontproperties=font)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("recall")
    ax.set_title("Test recall per class")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def _tick_font(count: int):
    from pipeline.figures import font_properties

    low, high = TICK_FONT_POINTS
    return font_properties(max(low, min(high, TICK_FONT_BUDGET / max(count, 1))))


def worst_errors(y_true: np.ndarray, probs: np.ndarray, limit: int) -> np.ndarray:
    """Indices of misclassified images, most confident wrong prediction first (at most ``limit``)."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    order = np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")
    return wrong[order][:limit]


def plot_worst_errors(images: np.ndarray, y_true: np.ndarray, probs: np.ndarray, chars: Sequence[str],
                      limit: int, path: Path) -> Path:
    """Grid of the most confidently wrong test images, titled ``true→predicted confidence``."""
    from pipeline.figures import save_image_grid

    picked = worst_errors(y_true, probs, limit)
    y_pred = probs.argmax(axis=1)
    titles = [f"{chars[y_true[i]]}→{chars[y_pred[i]]} {probs[i, y_pred[i]]:.2f}" for i in picked]
    suptitle = (f"Most confident test errors (true→predicted, confidence): {len(picked)} shown"
                if len(picked) else "No misclassified test images")
    return save_image_grid(images[picked], titles, path, columns=WORST_GRID_COLUMNS, suptitle=suptitle)


# -------------------------------------------------------------------------------------------- stage


def run(settings: Settings) -> dict[str, Any]:
    """Evaluate stage: predict the test split, write metrics/reports/figures, log them to the train run."""
    from pipeline import data, tracking
    from pipeline.training.bundle import load_bundle, select_device

    models = settings.path("models")
    model, meta = load_bundle(models / BUNDLE_FILE)
    run_id = TrainRun.read(models / TRAIN_RUN_FILE).run_id
    test = data.load_test(settings)
    chars = [str(char) for char in meta.get("classes", [])]
    num_classes = int(model.num_classes)
    if len(chars) != num_classes:
        raise EvaluationError(
            f"{models / BUNDLE_FILE}: the model has {num_classes} outputs but its class map lists "
            f"{len(chars)} characters; re-run the train stage"
        )
    if len(test) and int(test.labels.max()) >= num_classes:
        raise EvaluationError(
            f"the test split has label {int(test.labels.max())} but the model knows {num_classes} classes: "
            f"it was trained on other data than data.dataset={settings.data.dataset!r}; "
            "re-run prepare and train"
        )

    cfg = settings.evaluate
    device = select_device(settings.train.device)
    # The served function: temperature and any test-time views (model.tta_rotations_deg) are in the model.
    logits = predict(model, test.images, cfg.batch_size, device)
    probs = softmax(logits)
    y_true, y_pred = test.labels, probs.argmax(axis=1)

    summary = summarize(y_true, y_pred, num_classes)
    summary["tta_views"] = max(1, len(model.tta_rotations_deg))
    trust = Trust.from_meta(meta)
    summary.update(_trust_metrics(settings, model, device, logits, y_true, trust))
    recall, support = per_class_recall(y_true, y_pred, num_classes)
    matrix = confusion(y_true, y_pred, num_classes)

    reports = settings.path("reports")
    eval_dir, figures_dir = reports / EVAL_DIR, reports / FIGURES_DIR
    metrics_path = write_json(eval_dir / METRICS_FILE, summary)
    per_class_path = _write_csv(eval_dir / PER_CLASS_FILE, pd.DataFrame({
        "index": np.arange(num_classes), "char": chars, "recall": np.round(recall, METRIC_DIGITS),
        "support": support,
    }))
    predictions_path = _write_csv(eval_dir / PREDICTIONS_FILE, pd.DataFrame({
        "actual": [chars[i] for i in y_true], "predicted": [chars[i] for i in y_pred],
    }))
    curves = write_curves(logits, y_true, trust, eval_dir)
    figures = [
        *plot_trust(logits, y_true, trust, summary, figures_dir),
        plot_confusion(matrix, chars, figures_dir / CONFUSION_FIGURE),
        plot_per_class_recall(recall, support, chars, summary["test_balanced_accuracy"],
                              figures_dir / RECALL_FIGURE),
        plot_worst_errors(test.images, y_true, probs, chars, cfg.worst_examples, figures_dir / WORST_FIGURE),
    ]

    with tracking.start_run(settings, "evaluate", run_id=run_id):
        # The share each non-kana set has caught stays in metrics.json; the run keeps its AUROC, so MLflow's
        # comparison lists the scores that matter without scrolling.
        tracking.log_metrics({key: value for key, value in summary.items()
                              if key != "n_test" and not key.startswith("ood_detected_")})
        tracking.log_files([metrics_path, per_class_path, predictions_path, *curves], EVAL_ARTIFACT)
        tracking.log_files(figures, FIGURES_ARTIFACT)
    log.info("test metrics: %s", summary)
    return {**summary, "run_id": run_id, "metrics": str(metrics_path),
            "figures": [str(path) for path in figures]}


def _trust_metrics(settings: Settings, model: Any, device: Any, logits: np.ndarray, labels: np.ndarray,
                   trust: Trust | None) -> dict[str, float]:
    """Calibration on the test split, and the non-kana sets through the same model (pipeline.trust)."""
    from pipeline.training.bundle import predict_logits
    from pipeline.trust.nonkana import nonkana_sets

    outliers = {} if trust is None else {
        name: predict_logits(model, images, settings.evaluate.batch_size, device)
        for name, images in nonkana_sets(settings.seed).items()
    }
    return trust_metrics(logits, labels, trust, outliers)


def _write_csv(path: Path, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as temp:
        frame.to_csv(temp, index=False, encoding="utf-8")
    return path
