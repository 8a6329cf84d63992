"""Evaluation: metric definitions, TTA, figures and the evaluate stage on real (synthetic) files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from pipeline import tracking
from pipeline.config import Settings
from pipeline.contract import BUNDLE_FILE, TRAIN_RUN_FILE, DataError, TrainRun
from pipeline.stages import evaluate
from pipeline.training.bundle import save_bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARS = ["あ", "い", "う", "え", "お"]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def test_balanced_accuracy_matches_sklearn_on_hand_made_case() -> None:
    # 6 of class 0 (5 right), 3 of class 1 (1 right), 1 of class 2 (right): recalls 5/6, 1/3, 1.
    y_true = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 2])
    expected = (5 / 6 + 1 / 3 + 1) / 3
    assert evaluate.balanced_accuracy(y_true, y_pred) == pytest.approx(expected)
    reference = balanced_accuracy_score(y_true, y_pred)
    assert evaluate.balanced_accuracy(y_true, y_pred) == pytest.approx(reference)
    assert evaluate.accuracy(y_true, y_pred) == pytest.approx(0.7)


def test_balanced_accuracy_differs_from_accuracy_when_imbalanced() -> None:
    # Always predicting the majority class: 90% accurate, but only half the classes are recognised.
    y_true = np.array([0] * 90 + [1] * 10)
    y_pred = np.zeros(100, dtype=np.int64)
    assert evaluate.accuracy(y_true, y_pred) == pytest.approx(0.9)
    assert evaluate.balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)


def test_macro_f1_counts_never_predicted_classes() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 0, 0])
    expected = f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)
    assert evaluate.macro_f1(y_true, y_pred, 4) == pytest.approx(expected)


def test_per_class_recall_and_confusion() -> None:
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 1, 1, 1, 0])
    recall, support = evaluate.per_class_recall(y_true, y_pred, 3)
    np.testing.assert_allclose(recall[:2], [0.5, 2 / 3])
    assert np.isnan(recall[2])  # class 2 is absent: no recall, not a fake 0 or 1
    assert support.tolist() == [2, 3, 0]
    assert evaluate.confusion(y_true, y_pred, 3).tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    summary = evaluate.summarize(y_true, y_pred, 3)
    assert summary["n_test"] == 5
    assert summary["test_balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-6)


def test_worst_errors_order_by_confidence() -> None:
    y_true = np.array([0, 1, 2, 0])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.05, 0.95, 0.0], [0.2, 0.7, 0.1]])
    assert evaluate.worst_errors(y_true, probs, 10).tolist() == [2, 3, 1]
    assert evaluate.worst_errors(y_true, probs, 1).tolist() == [2]


def test_figures_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, len(CHARS), 60)
    probs = rng.dirichlet(np.ones(len(CHARS)), 60)
    y_pred = probs.argmax(axis=1)
    images = rng.integers(0, 256, (60, 28, 28)).astype(np.uint8)
    recall, support = evaluate.per_class_recall(y_true, y_pred, len(CHARS))
    paths = [
        evaluate.plot_confusion(evaluate.confusion(y_true, y_pred, len(CHARS)), CHARS, tmp_path / "c.png"),
        evaluate.plot_per_class_recall(recall, support, CHARS, 0.3, tmp_path / "r.png"),
        evaluate.plot_worst_errors(images, y_true, probs, CHARS, 12, tmp_path / "w.png"),
        evaluate.plot_worst_errors(images[:1], y_pred[:1], probs[:1], CHARS, 12, tmp_path / "none.png"),
    ]
    for path in paths:
        assert_png(path)


def test_missing_train_run_record_is_explained(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run the train stage"):
        TrainRun.read(tmp_path / "train_run.json")
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="re-run the train stage"):
        TrainRun.read(tmp_path / "bad.json")


@pytest.mark.slow
def test_evaluate_stage_end_to_end(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Synthetic test split + an (untrained) saved bundle + a real MLflow run: every output is written."""
    from pipeline import data
    from pipeline.model import SpinalVGG
    from pipeline.stages import download

    monkeypatch.delenv(tracking.TRACKING_URI_ENV, raising=False)
    settings = make_settings({
        "data.dataset": "synthetic", "data.synthetic.train_per_class": 1, "data.synthetic.test_per_class": 2,
        "model.tta_rotations_deg": [-6.0, 0.0, 6.0], "evaluate.worst_examples": 10, "train.device": "cpu",
    })
    download.run(settings)
    classmap = data.load_classmap(settings.path("raw") / "k49_classmap.csv")
    torch.manual_seed(0)
    model = SpinalVGG(len(classmap), spinal_width=8, dropout=0.5, pixel_mean=0.2, pixel_std=0.3,
                      tta_rotations_deg=settings.model.tta_rotations_deg).calibrate(2.0)
    models = settings.path("models")
    trust = {"temperature": 2.0, "confidence_threshold": 0.5, "ood_threshold": 1.0}
    save_bundle(models / BUNDLE_FILE, model, {"classes": list(classmap.chars), "trust": trust})
    with tracking.start_run(settings, "train") as active:
        pass
    (models / TRAIN_RUN_FILE).write_text(json.dumps({"run_id": active.info.run_id}), encoding="utf-8")

    result = evaluate.run(settings)

    test = data.load_test(settings)
    reports = settings.path("reports")
    metrics = json.loads((reports / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_test"] == len(test) == 2 * len(classmap)
    assert metrics["tta_views"] == len(settings.model.tta_rotations_deg)  # the bundle's views were scored
    assert 0.0 <= metrics["test_balanced_accuracy"] <= 1.0
    assert result["test_accuracy"] == metrics["test_accuracy"]
    predictions = pd.read_csv(reports / "eval" / "predictions.csv")
    assert len(predictions) == len(test)
    assert predictions["actual"].tolist() == [classmap.chars[i] for i in test.labels]
    recomputed = balanced_accuracy_score(predictions["actual"], predictions["predicted"])
    assert recomputed == pytest.approx(metrics["test_balanced_accuracy"], abs=1e-6)
    per_class = pd.read_csv(reports / "eval" / "per_class.csv")
    assert per_class["char"].tolist() == list(classmap.chars) and per_class["support"].sum() == len(test)
    for name in ("confusion_matrix.png", "per_class_recall.png", "worst_errors.png", "reliability_diagram.png",
                 "risk_coverage.png"):
        assert_png(reports / "figures" / name)
    # Trust (pipeline.trust.report): calibration before/after, the thresholds at work, non-kana sets.
    assert metrics["test_temperature"] == 2.0
    assert {"test_ece", "test_ece_uncalibrated", "test_nll", "test_nll_uncalibrated", "test_coverage_at_target",
            "test_ood_false_alarm", "ood_auroc_sklearn_digits", "ood_auroc_latin_letters",
            "ood_detected_noise"} <= set(metrics)
    assert 0.0 <= metrics["test_ece"] <= 1.0 and 0.0 <= metrics["ood_auroc_kanji"] <= 1.0
    reliability = pd.read_csv(reports / "eval" / "reliability.csv")
    assert set(reliability["model"]) == {"calibrated", "uncalibrated"} and reliability["count"].sum() == 2 * len(test)
    curve = pd.read_csv(reports / "eval" / "risk_coverage.csv")
    assert curve["coverage"].iloc[-1] == 1.0 and curve["coverage"].is_monotonic_increasing

    run = mlflow.MlflowClient(tracking.tracking_uri(settings)).get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_balanced_accuracy"] == pytest.approx(metrics["test_balanced_accuracy"])
    assert run.data.metrics["test_ece"] == pytest.approx(metrics["test_ece"])
    assert run.data.metrics["ood_auroc_sklearn_digits"] == pytest.approx(metrics["ood_auroc_sklearn_digits"])
    assert not any(key.startswith("ood_detected_") for key in run.data.metrics)  # metrics.json keeps them
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(active.info.run_id, "figures")}
    assert "figures/confusion_matrix.png" in artifacts
