"""Temperature scaling (Guo et al., ICML 2017) and the two thresholds, fitted on validation logits; and the
measures of how honest the probabilities are (ECE, NLL, risk-coverage, AUROC). NumPy and SciPy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from pipeline.contract import in_domain_score, softmax

ECE_BINS = 15  # the usual choice (Guo et al.): comparable with published calibration errors
# Search range of log(T): T in [0.05, 20] covers any model worth serving; the fit is 1-D and convex in 1/T.
LOG_T_BOUNDS = (-3.0, 3.0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature)."""
    if not len(labels):
        return float("nan")
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T); T > 1 cools an overconfident model."""
    if not len(labels):
        return 1.0
    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                            bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: mean confidence, accuracy and image count (empty bins have count 0)."""

    lower: np.ndarray
    upper: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Equal-width bins of the top probability (the reliability diagram's data)."""
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return Reliability(edges[:-1], edges[1:], mean_conf, accuracy, count)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    if not len(labels):
        return float("nan")
    table = reliability(probs, labels, bins)
    filled = table.count > 0
    gaps = np.abs(table.accuracy[filled] - table.confidence[filled])
    return float((gaps * table.count[filled]).sum() / table.count.sum())


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(threshold, coverage, accuracy on the answered) when answering the k most confident, k = 1..N."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order].astype(np.float64))
    answered = np.arange(1, len(order) + 1)
    return confidence[order], answered / max(len(order), 1), hits / answered


def confidence_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest top probability that still keeps the answered images' accuracy at ``target`` or above.

    With no prefix reaching the target the threshold is 1.0 (nothing short of certainty is "confident").
    """
    thresholds, _, accuracy = risk_coverage(confidence, correct)
    meets = np.flatnonzero(accuracy >= target)
    if not len(meets):
        return 1.0
    return float(thresholds[meets[-1]])


def ood_threshold(in_domain_scores: np.ndarray, false_alarm: float) -> float:
    """The score under which an image is called "not a kana": the ``false_alarm`` quantile of real kana."""
    if not len(in_domain_scores):
        return float("-inf")
    return float(np.quantile(in_domain_scores, false_alarm))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(a kana scores above a non-kana image), ties counted half: the threshold-free separation."""
    if not len(in_scores) or not len(out_scores):
        return float("nan")
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    return float(roc_auc_score(labels, np.concatenate([in_scores, out_scores])))


@dataclass(frozen=True)
class TrustFit:
    """What the train stage fits on validation and meta.json carries to evaluate and the service."""

    temperature: float
    confidence_threshold: float
    ood_threshold: float
    answered_accuracy: float  # the targets they were fitted for
    ood_false_alarm: float
    val_images: int

    def as_meta(self) -> dict[str, float | int | str]:
        return {"temperature": self.temperature, "confidence_threshold": self.confidence_threshold,
                "ood_threshold": self.ood_threshold, "ood_score": "logsumexp of the calibrated logits",
                "answered_accuracy": self.answered_accuracy, "ood_false_alarm": self.ood_false_alarm,
                "val_images": self.val_images}


def fit_trust(logits: np.ndarray, labels: np.ndarray, answered_accuracy: float,
              ood_false_alarm: float) -> TrustFit:
    """Temperature, then both thresholds on the calibrated validation logits (never the test split)."""
    temperature = fit_temperature(logits, labels)
    calibrated = np.asarray(logits, dtype=np.float64) / temperature
    probs = softmax(calibrated)
    correct = probs.argmax(axis=1) == labels
    return TrustFit(
        temperature=round(temperature, 6),
        confidence_threshold=round(confidence_threshold(probs.max(axis=1), correct, answered_accuracy), 6),
        ood_threshold=round(ood_threshold(in_domain_score(calibrated), ood_false_alarm), 6),
        answered_accuracy=answered_accuracy, ood_false_alarm=ood_false_alarm, val_images=len(labels),
    )

