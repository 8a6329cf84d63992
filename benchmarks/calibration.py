"""Answers a person can trust, measured on real data: ECE before and after the temperature, accuracy
unchanged, coverage at the target answered accuracy, "not a kana" AUROC per non-kana set and the false-alarm
rate on real kana (benchmarks/TRUST.md).

(a) ``--data DIR``: the real stages (download from the folder, prepare, no tuning, train with its refit,
    evaluate) on the ``full`` profile with ``--epochs`` epochs in a scratch folder; the figures are the
    evaluate stage's own ``reports/eval/metrics.json``.
(b) ``--project DIR``: a project another run trained (read only): its ``models/model.pt``, prepared
    validation split and test files. A model trained before calibration is fitted here on that validation
    split; after a refit that split was trained on, so the fitted figures are marked ``val_seen_by_model``.

    python -m benchmarks.calibration --data ../shared/data/kmnist-dev --epochs 4 \
        --out benchmarks/results/calibration_kmnist_dev.json
    python -m benchmarks.calibration --project /work/run60k --out benchmarks/results/calibration_kmnist_60k.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.real_data import _commit
from benchmarks.train_throughput import cpu_model_name
from pipeline import data
from pipeline.config import PROJECT_ROOT, load_settings, write_params
from pipeline.contract import BUNDLE_FILE, Trust
from pipeline.training.bundle import load_bundle, predict_logits
from pipeline.trust.calibration import fit_trust
from pipeline.trust.nonkana import nonkana_sets
from pipeline.trust.report import trust_metrics

DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "kmnist-dev"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = 512


def through_the_stages(data_dir: Path, epochs: int, work: Path, seed: int | None) -> dict[str, Any]:
    """(a): the pipeline's own figures for a model it trained and calibrated."""
    from pipeline.stages import download, evaluate, prepare, train, tune

    seeded = [f"seed={seed}"] if seed is not None else []
    settings = load_settings(write_params(work / "params.yaml", [
        "profile=full", "data.dataset=local", f"data.local_dir={data_dir.resolve()}", "tune.n_trials=0",
        f"train.epochs={epochs}", "train.device=cpu", *seeded]))
    started = time.perf_counter()
    download.run(settings)
    prepare.run(settings)
    tune.run(settings)
    trained = train.run(settings)
    evaluate.run(settings)
    metrics = json.loads((settings.path("reports") / "eval" / "metrics.json").read_text(encoding="utf-8"))
    _, meta = load_bundle(settings.path("models") / BUNDLE_FILE)
    return {"metrics": metrics, "trust": meta.get("trust"), "n_train": trained["n_train"],
            "n_val": trained["n_val"], "refit": trained["refit"], "model_epochs": trained["model_epochs"],
            "accuracy_uncalibrated": _uncalibrated_accuracy(settings, meta),
            "seconds": round(time.perf_counter() - started, 1), "fitted_on": "validated model, validation split"}


def _uncalibrated_accuracy(settings: Any, meta: dict[str, Any]) -> float:
    """Test accuracy of the logits x T: the temperature divides every logit alike, so it must be equal."""
    model, _ = load_bundle(settings.path("models") / BUNDLE_FILE)
    test = data.load_test(settings)
    trust = Trust.from_meta(meta)
    raw = predict_logits(model, test.images, BATCH) * (trust.temperature if trust else 1.0)
    return round(float((raw.argmax(axis=1) == test.labels).mean()), 6)


def _merged(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    merged = dict(ours)
    for key, value in theirs.items():
        nested = isinstance(value, dict) and isinstance(ours.get(key), dict)
        merged[key] = _merged(ours[key], value) if nested else value
    return merged


def _project_settings(project: Path) -> Any:
    """The project's params.yaml, with this checkout's defaults for the keys added since it ran."""
    ours = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text(encoding="utf-8"))
    theirs = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as folder:
        merged = Path(folder) / "params.yaml"
        merged.write_text(yaml.safe_dump(_merged(ours, theirs), allow_unicode=True), encoding="utf-8")
        return load_settings(merged).model_copy(update={"root": project.resolve()})


def from_a_project(project: Path, test_dir: Path, answered_accuracy: float, false_alarm: float,
                   seed: int) -> dict[str, Any]:
    """(b): a trained project's model and prepared validation split, and the official test files, in place."""
    settings = _project_settings(project)
    model, meta = load_bundle(settings.path("models") / BUNDLE_FILE)
    val = data.load_prepared(settings, "val")
    test = data.load_official(test_dir, data.local_prefix(test_dir, None)).test
    trust = Trust.from_meta(meta)
    fitted_on = "the project's own fit (validated model, validation split)"
    if trust is None:
        val_logits = predict_logits(model, val.images, BATCH)
        fit = fit_trust(val_logits, val.labels, answered_accuracy, false_alarm)
        model.calibrate(fit.temperature)
        trust = Trust(fit.temperature, fit.confidence_threshold, fit.ood_threshold)
        fitted_on = ("here, on the project's validation split" +
                     (" (val_seen_by_model: the refit trained on it)" if settings.train.refit else ""))
    logits = predict_logits(model, test.images, BATCH)
    outliers = {name: predict_logits(model, images, BATCH) for name, images in nonkana_sets(seed).items()}
    metrics = trust_metrics(logits, test.labels, trust, outliers)
    metrics["test_accuracy"] = round(float((logits.argmax(axis=1) == test.labels).mean()), 6)
    return {"metrics": metrics, "trust": {"temperature": trust.temperature,
                                          "confidence_threshold": trust.confidence_threshold,
                                          "ood_threshold": trust.ood_threshold},
            "n_val": len(val), "n_test": len(test), "refit": settings.train.refit, "fitted_on": fitted_on,
            "project": str(project)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder in the official layout: train here")
    parser.add_argument("--project", type=Path, default=None, help="a trained project folder, read only")
    parser.add_argument("--test-data", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "kmnist-60k",
                        help="with --project: the official files whose test split is scored")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    commit = _commit()
    defaults = load_settings().evaluate
    if args.project:
        result = from_a_project(args.project, args.test_data, defaults.answered_accuracy, defaults.ood_false_alarm,
                                load_settings().seed if args.seed is None else args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="calibration-") as scratch:
            result = through_the_stages(args.data or DEFAULT_DATA, args.epochs, Path(scratch), args.seed)
        result.update({"data": str(args.data or DEFAULT_DATA), "epochs": args.epochs, "seed": args.seed})
    result.update({
        "commit": commit, "targets": {"answered_accuracy": defaults.answered_accuracy,
                                      "ood_false_alarm": defaults.ood_false_alarm},
        "machine": {"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "numpy": np.__version__},
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
