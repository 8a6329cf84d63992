"""What evaluate reports about trust, on the test split (read once, never fitted on): calibration before and
after the temperature, the risk-coverage curve at the fitted confidence threshold, and how well the in-domain
score separates real kana from the non-kana sets at the fitted threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.contract import Trust, in_domain_score, softmax
from pipeline.files import atomic_path
from pipeline.trust.calibration import auroc as auroc_of
from pipeline.trust.calibration import ece, nll, reliability, risk_coverage

RELIABILITY_FILE = "reliability.csv"
RISK_COVERAGE_FILE = "risk_coverage.csv"
RELIABILITY_FIGURE = "reliability_diagram.png"
RISK_COVERAGE_FIGURE = "risk_coverage.png"
CURVE_POINTS = 200  # rows of risk_coverage.csv: enough for the plot, small for DVC
DIGITS = 6


def trust_metrics(logits: np.ndarray, labels: np.ndarray, trust: Trust | None,
                  outliers: dict[str, np.ndarray]) -> dict[str, float]:
    """Test metrics of the calibrated ``logits`` (raw = logits x T) and of the non-kana sets' logits."""
    temperature = trust.temperature if trust else 1.0
    raw = logits * temperature
    probs = softmax(logits)
    values = {
        "test_temperature": temperature,
        "test_ece": ece(probs, labels), "test_ece_uncalibrated": ece(softmax(raw), labels),
        "test_nll": nll(logits, labels), "test_nll_uncalibrated": nll(raw, labels),
    }
    if trust is not None:
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
        answered = confidence >= trust.confidence_threshold
        values["test_coverage_at_target"] = float(answered.mean()) if len(answered) else float("nan")
        values["test_answered_accuracy"] = float(correct[answered].mean()) if answered.any() else float("nan")
        kana = in_domain_score(logits)
        values["test_ood_false_alarm"] = float((kana < trust.ood_threshold).mean()) if len(kana) else float("nan")
        for name, out_logits in outliers.items():
            scores = in_domain_score(out_logits)
            values[f"ood_auroc_{name}"] = auroc_of(kana, scores)
            values[f"ood_detected_{name}"] = float((scores < trust.ood_threshold).mean())
    # NaN (an empty split or set) is left out: JSON has no NaN and DVC would not read it.
    return {key: round(float(value), DIGITS) for key, value in values.items() if not np.isnan(value)}


def write_curves(logits: np.ndarray, labels: np.ndarray, trust: Trust | None, eval_dir: Path) -> list[Path]:
    """reliability.csv (per bin, before and after) and risk_coverage.csv (DVC plots)."""
    temperature = trust.temperature if trust else 1.0
    rows = []
    for name, probs in (("uncalibrated", softmax(logits * temperature)), ("calibrated", softmax(logits))):
        table = reliability(probs, labels)
        rows += [{"model": name, "bin_upper": round(float(upper), 4), "confidence": _round(conf),
                  "accuracy": _round(acc), "count": int(count)}
                 for upper, conf, acc, count in zip(table.upper, table.confidence, table.accuracy,
                                                    table.count, strict=True)]
    probs = softmax(logits)
    threshold, coverage, accuracy = risk_coverage(probs.max(axis=1), probs.argmax(axis=1) == labels)
    keep = np.unique(np.linspace(0, len(coverage) - 1, min(CURVE_POINTS, len(coverage))).round().astype(int))
    curve = pd.DataFrame({"coverage": coverage[keep].round(DIGITS), "answered_accuracy": accuracy[keep].round(DIGITS),
                          "threshold": threshold[keep].round(DIGITS)})
    return [_csv(eval_dir / RELIABILITY_FILE, pd.DataFrame(rows)), _csv(eval_dir / RISK_COVERAGE_FILE, curve)]


def plot_trust(logits: np.ndarray, labels: np.ndarray, trust: Trust | None, metrics: dict[str, Any],
               figures_dir: Path) -> list[Path]:
    """The reliability diagram (before/after the temperature) and the risk-coverage curve."""
    from pipeline.figures import new_figure, save_figure

    temperature = trust.temperature if trust else 1.0
    fig, ax = new_figure(5.5, 5.0)
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for name, probs, key in (("before", softmax(logits * temperature), "test_ece_uncalibrated"),
                             ("after", softmax(logits), "test_ece")):
        table = reliability(probs, labels)
        filled = table.count > 0
        ax.plot(table.confidence[filled], table.accuracy[filled], marker="o",
                label=f"{name} (T={temperature:.3f})" if name == "after" else name)
        ax.annotate(f"ECE {name} {metrics[key]:.4f}", (0.02, 0.93 if name == "before" else 0.86),
                    xycoords="axes fraction")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Test reliability diagram (15 bins)")
    ax.legend(loc="lower right")
    reliability_path = save_figure(fig, figures_dir / RELIABILITY_FIGURE)

    probs = softmax(logits)
    _, coverage, accuracy = risk_coverage(probs.max(axis=1), probs.argmax(axis=1) == labels)
    fig, ax = new_figure(5.5, 4.0)
    ax.plot(coverage, accuracy, label="test")
    if "test_answered_accuracy" in metrics:  # absent when the threshold answers nothing
        ax.scatter([metrics["test_coverage_at_target"]], [metrics["test_answered_accuracy"]], color="tab:red",
                   zorder=3, label=f"threshold from validation ({metrics['test_coverage_at_target']:.1%} answered)")
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("accuracy on the answered")
    ax.set_title("Test risk-coverage")
    ax.legend(loc="lower left")
    return [reliability_path, save_figure(fig, figures_dir / RISK_COVERAGE_FIGURE)]


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), DIGITS)


def _csv(path: Path, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as temp:
        frame.to_csv(temp, index=False, encoding="utf-8")
    return path
