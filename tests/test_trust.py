"""pipeline.trust: the temperature fit, the thresholds and their measures, on toys whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.contract import READINGS, Trust, in_domain_score, softmax
from pipeline.data import OFFICIAL_CLASSMAPS
from pipeline.trust.calibration import (
    auroc,
    confidence_threshold,
    ece,
    fit_temperature,
    fit_trust,
    nll,
    ood_threshold,
    reliability,
    risk_coverage,
)


def _toy(scale: float, n: int = 20_000, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z): z is calibrated by construction, z x ``scale`` is not (unless 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, classes))
    probs = softmax(z)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z * scale, labels


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_the_temperature_undoes_a_known_miscalibration(scale):
    logits, labels = _toy(scale)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(scale, rel=0.05)  # z x scale / T = z: the calibrated logits
    assert (temperature > 1) == (scale > 1)  # overconfident -> colder (T > 1); underconfident -> warmer
    assert nll(logits, labels, temperature) < nll(logits, labels)
    calibrated = softmax(logits / temperature)
    assert ece(calibrated, labels) < 0.5 * ece(softmax(logits), labels)
    assert ece(calibrated, labels) < 0.02


def test_a_calibrated_toy_keeps_t_near_one():
    logits, labels = _toy(1.0)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_ece_and_reliability_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])  # bin of 0.9: accuracy 0.5; bin of 0.6: accuracy 1.0
    assert ece(probs, labels, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    table = reliability(probs, labels, bins=10)
    assert table.count.sum() == 4 and table.count[8] == 2 and table.count[5] == 2
    assert table.accuracy[8] == pytest.approx(0.5) and table.confidence[5] == pytest.approx(0.6)


def test_the_confidence_threshold_keeps_the_target_accuracy():
    confidence = np.array([0.99, 0.98, 0.97, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, True, False, True, False])
    threshold, coverage, accuracy = risk_coverage(confidence, correct)
    assert coverage[-1] == 1.0 and accuracy[3] == 1.0 and accuracy[4] == pytest.approx(0.8)
    assert confidence_threshold(confidence, correct, 1.0) == 0.9  # the first four are all right
    assert confidence_threshold(confidence, correct, 0.8) == 0.7  # 5 of 6 answered are right
    assert confidence_threshold(confidence, ~correct, 0.99) == 1.0  # never reached: nothing is confident


def test_the_ood_threshold_is_the_false_alarm_quantile_and_auroc_ranks():
    kana = np.arange(1000, dtype=float)
    assert ood_threshold(kana, 0.01) == pytest.approx(np.quantile(kana, 0.01))
    assert np.mean(kana < ood_threshold(kana, 0.05)) == pytest.approx(0.05, abs=0.002)
    assert auroc(kana + 2000, kana) == 1.0 and auroc(kana, kana + 2000) == 0.0
    assert auroc(kana, kana) == pytest.approx(0.5)


def test_fit_trust_fits_on_calibrated_logits_and_the_verdicts_follow():
    logits, labels = _toy(3.0)
    fitted = fit_trust(logits, labels, answered_accuracy=0.99, ood_false_alarm=0.02)
    calibrated = logits / fitted.temperature
    trust = Trust.from_meta({"trust": fitted.as_meta()})
    assert trust is not None and trust.temperature == fitted.temperature
    judged = trust.judge(calibrated)
    confident = np.array([v["confident"] for v in judged])
    in_domain = np.array([v["in_domain"] for v in judged])
    probs = softmax(calibrated)
    right = probs.argmax(axis=1) == labels
    assert right[confident].mean() >= 0.99 - 1e-9  # the fitted split meets its target
    assert np.mean(~in_domain) == pytest.approx(0.02, abs=0.002)
    assert all(("reason" in v) == (not v["in_domain"]) for v in judged)
    assert not confident[~in_domain].any()  # "not a kana" is never a confident answer
    assert Trust.from_meta({"dataset": "k49"}) is None  # a model trained before calibration


def test_in_domain_score_is_a_stable_logsumexp():
    logits = np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]])
    assert in_domain_score(logits) == pytest.approx([1000.0 + np.log(2.0), np.log(4.0)])


def test_every_k49_and_kmnist_class_has_a_reading():
    for classmap in OFFICIAL_CLASSMAPS.values():
        assert all(READINGS.get(char) for char in classmap.chars), classmap.chars
    assert READINGS["あ"] == "a" and READINGS["し"] == "shi" and READINGS["ん"] == "n"
