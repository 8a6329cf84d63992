"""The real-data benchmark's summary: the mean over seeds and the paired difference's standard error."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.real_data import summarize


def _result(seed: int, pipeline: float, plain: float) -> dict[str, object]:
    return {"seed": seed, "pipeline_full_recipe": {"test_balanced_accuracy": pipeline},
            "plain_loop": {"test_balanced_accuracy": plain}}


def test_summary_pairs_runs_by_seed_and_reports_the_spread() -> None:
    summary = summarize([_result(1, 0.985, 0.983), _result(2, 0.984, 0.988), _result(3, 0.990, 0.986)])
    assert summary["runs"] == 3 and summary["seeds"] == [1, 2, 3]
    assert summary["pipeline_mean"] == pytest.approx(98.633, abs=1e-3)
    assert summary["plain_mean"] == pytest.approx(98.567, abs=1e-3)
    # differences +0.2, -0.4, +0.4 points: mean 0.067, sample SD 0.416, standard error 0.240
    assert summary["pipeline_minus_plain_points"] == pytest.approx(0.067, abs=1e-3)
    assert summary["standard_error_points"] == pytest.approx(0.416 / math.sqrt(3), abs=1e-3)
    assert summary["pipeline_ahead_or_level"] == 2


def test_one_run_has_no_standard_error_and_none_is_an_error() -> None:
    assert summarize([_result(0, 0.98, 0.97)])["standard_error_points"] is None
    with pytest.raises(ValueError, match="nothing to summarize"):
        summarize([])


def test_result_files_summarize_from_the_command_line(tmp_path: Path) -> None:
    files = []
    for seed, (a, b) in enumerate([(0.98, 0.97), (0.99, 0.985)]):
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps(_result(seed, a, b)), encoding="utf-8")
        files.append(str(path))
    done = subprocess.run([sys.executable, "-m", "benchmarks.real_data", "--summarize", *files],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    summary = json.loads(done.stdout)
    assert summary["runs"] == 2 and summary["pipeline_minus_plain_points"] == pytest.approx(0.75)


def test_the_side_score_serves_the_kept_weights_through_onnx_with_and_without_views(tmp_path: Path,
                                                                                     one_torch_thread) -> None:
    """``served_balanced_accuracy`` scores the ONNX export of the bundle's weights with the views asked for,
    which is what the PyTorch model with those views predicts (an untrained model: any answer will do)."""
    import numpy as np
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from benchmarks.real_data import served_balanced_accuracy
    from pipeline.contract import BUNDLE_FILE
    from pipeline.data import LabeledImages
    from pipeline.model import SpinalVGG
    from pipeline.training.bundle import predict_logits, save_bundle

    torch.manual_seed(0)
    model = SpinalVGG(4, spinal_width=8, pixel_mean=0.2, pixel_std=0.3).eval()
    save_bundle(tmp_path / BUNDLE_FILE, model, {})
    rng = np.random.default_rng(0)
    test = LabeledImages(rng.integers(0, 256, (40, 28, 28)).astype(np.uint8), np.arange(40) % 4)
    for views in ([], [-20.0, 0.0, 20.0]):
        expected = balanced_accuracy_score(test.labels,
                                           predict_logits(model.set_views(views), test.images, 16).argmax(1))
        assert served_balanced_accuracy(tmp_path, test, views) == pytest.approx(expected)
    save_bundle(tmp_path / BUNDLE_FILE, model.set_views([-20.0, 0.0, 20.0]), {})  # None: the bundle's own views
    assert served_balanced_accuracy(tmp_path, test) == pytest.approx(expected)
