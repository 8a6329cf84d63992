"""The train stage: fit on the prepared split with the tuned values applied (selected on validation),
then with ``train.refit`` train on train + validation; write the bundle, its verified ONNX export,
reports and figures, all in one MLflow run. Precedence: defaults < profile < tuned < command line."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import export, tracking
from pipeline.config import Settings, explicit_keys
from pipeline.contract import (
    BEST_PARAMS_FILE,
    BUNDLE_FILE,
    CLASSMAP_FILE,
    GLYPH_SIDE,
    META_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    TRAIN_RUN_FILE,
    TRUST_KEY,
    TrainRun,
    read_best_params,
)
from pipeline.data import CLASSMAP_NAME
from pipeline.files import write_json
from pipeline.model import count_parameters
from pipeline.training.bundle import predict_logits, save_bundle, select_device
from pipeline.training.checkpoint import fingerprint
from pipeline.training.inputs import TrainingInputs, load_training_inputs
from pipeline.training.loop import fit
from pipeline.training.records import EpochMetrics, TrainResult
from pipeline.training.refit import model_epochs, refit
from pipeline.training.report import plot_augmented_samples, plot_training_curves, write_history
from pipeline.trust.calibration import TrustFit, fit_trust

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "train.pt"
REFIT_CHECKPOINT_FILE = "refit.pt"  # the refit on train + validation resumes from its own checkpoint
CHECKPOINT_RUN_FILE = "train_run.json"  # next to the checkpoint: the MLflow run a resumed stage continues
ONNX_EXAMPLE_IMAGES = 8  # validation images used to trace and verify the ONNX export


def apply_tuned(settings: Settings) -> Settings:
    """``settings`` with ``models/best_params.yaml`` overlaid, except the keys set on the command line."""
    path = settings.path("models") / BEST_PARAMS_FILE
    tuned = read_best_params(path)
    if not tuned:
        return settings
    pinned = explicit_keys(settings, tuned)
    applied = {key: value for key, value in tuned.items() if key not in pinned}
    if pinned:
        log.info("kept the command line's %s over the tuned values", sorted(pinned))
    log.info("applied tuned values from %s: %s", path, applied)
    return settings.with_overrides(applied) if applied else settings


def run(settings: Settings) -> dict[str, Any]:
    """Train stage: fit on the prepared split, write model/ONNX/reports/figures, track it all in MLflow."""
    settings = apply_tuned(settings)
    inputs = load_training_inputs(settings, settings.train.max_train_per_class, settings.train.max_val_per_class)
    checkpoint = settings.path("checkpoints") / CHECKPOINT_FILE
    run_marker = checkpoint.with_name(CHECKPOINT_RUN_FILE)
    run_fingerprint = fingerprint(settings, inputs.train, inputs.val, inputs.num_classes, inputs.pixel_mean,
                                  inputs.pixel_std)
    resume_id = _resumable_run(checkpoint, run_marker, run_fingerprint)
    with tracking.start_run(settings, "train", run_id=resume_id) as active:
        write_json(run_marker, {"run_id": active.info.run_id, "fingerprint": run_fingerprint})
        if resume_id is None:  # params are immutable in MLflow: a resumed run already has them
            tracking.log_settings(settings)
            tracking.log_dataset(settings, {"train": len(inputs.train), "val": len(inputs.val)})
        result = fit(settings, inputs.train, inputs.val, inputs.num_classes, inputs.pixel_mean,
                     inputs.pixel_std, callbacks=[_log_epoch("")], checkpoint_path=checkpoint)
        # Views first: the temperature and thresholds are fitted on the logits that will be served.
        views = settings.model.tta_rotations_deg
        trust = _fit_trust(settings, result.model.set_views(views), inputs)  # before the refit sees val
        runs = [result]  # the validated run, then the refit when there is one: the last is exported
        if settings.train.refit:
            runs.append(refit(settings, result, inputs, callbacks=[_log_epoch("refit_")],
                              checkpoint_path=settings.path("checkpoints") / REFIT_CHECKPOINT_FILE))
            runs[-1].model.set_views(views)
        summary = _summary(settings, inputs, runs)
        meta = _meta(settings, inputs, result, active.info.run_id)
        if trust is not None:
            runs[-1].model.calibrate(trust.temperature)
            meta[TRUST_KEY] = trust.as_meta()
            summary.update({f"val_{key}": value for key, value in trust.as_meta().items()
                            if key in ("temperature", "confidence_threshold", "ood_threshold")})
        outputs = _write_model(settings, inputs, runs[-1].model, meta)
        _write_reports(settings, inputs, runs, summary)
        record = TrainRun(active.info.run_id, active.info.experiment_id,
                          tracking.redact(tracking.tracking_uri(settings)))
        record.write(settings.path("models") / TRAIN_RUN_FILE)
    # Finished and recorded: a later run (e.g. after a code change) must train afresh, not resume.
    checkpoint.unlink(missing_ok=True)
    checkpoint.with_name(REFIT_CHECKPOINT_FILE).unlink(missing_ok=True)
    run_marker.unlink(missing_ok=True)
    return {**summary, **asdict(record), **outputs}


def _fit_trust(settings: Settings, model: Any, inputs: TrainingInputs) -> TrustFit | None:
    """Temperature and thresholds from the validated model's validation logits: the one split held out from
    the model that chose the epoch. The refit's model gets them too: it never had a held-out split of its
    own, and its test figures (evaluate) show how well they carry over."""
    if not len(inputs.val):
        log.warning("no validation images: the model ships uncalibrated, without confidence thresholds")
        return None
    logits = predict_logits(model, inputs.val.images, settings.evaluate.batch_size,
                            select_device(settings.train.device))
    fitted = fit_trust(logits, inputs.val.labels, settings.evaluate.answered_accuracy,
                       settings.evaluate.ood_false_alarm)
    log.info("calibration on %d validation images: %s", len(inputs.val), fitted.as_meta())
    return fitted


def _log_epoch(prefix: str):
    def log_epoch(metrics: EpochMetrics) -> None:
        values = metrics.as_dict()
        tracking.log_epoch(int(values.pop("epoch")), {f"{prefix}{key}": value for key, value in values.items()})

    return log_epoch


def _summary(settings: Settings, inputs: TrainingInputs, runs: Sequence[TrainResult]) -> dict[str, Any]:
    result, final, best = runs[0], runs[-1], runs[0].best
    return {
        "best_epoch": result.best_epoch,
        "best_val_balanced_accuracy": best.val_balanced_accuracy,
        "best_val_accuracy": best.val_accuracy,
        "best_val_loss": best.val_loss,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "n_train": len(inputs.train),
        "n_val": len(inputs.val),
        "refit": settings.train.refit,
        # The exported model's training length: the validated run's best epoch, plus or (refit from
        # scratch) instead of the refit's epochs on train + val.
        "model_epochs": model_epochs(settings.train, result, runs[1:]),
        "model_train_images": len(inputs.train) + (len(inputs.val) if settings.train.refit else 0),
        "num_classes": inputs.num_classes,
        "parameters": count_parameters(final.model),
        "device": final.device,
        "train_seconds": round(sum(m.seconds for run in runs for m in run.history), 3),
    }


def _meta(settings: Settings, inputs: TrainingInputs, result: TrainResult, run_id: str) -> dict[str, Any]:
    """meta.json of the model bundle (pipeline.contract): what serving reads besides the ONNX graph."""
    return {
        "architecture": "SpinalVGG",
        "dataset": settings.data.dataset,
        "classes": list(inputs.classmap.chars),
        "codepoints": list(inputs.classmap.codepoints),
        "image_side": GLYPH_SIDE,
        "input": {"name": ONNX_INPUT, "dtype": "float32",
                  "shape": ["batch", 1, GLYPH_SIDE, GLYPH_SIDE], "range": [0, 255],
                  "polarity": "white ink on black"},
        "output": {"name": ONNX_OUTPUT, "kind": "logits"},
        "pixel_mean": inputs.pixel_mean,
        "pixel_std": inputs.pixel_std,
        "best_val_balanced_accuracy": result.best.val_balanced_accuracy,
        "refit": settings.train.refit,
        "tta_rotations_deg": list(settings.model.tta_rotations_deg),  # averaged inside the ONNX graph
        "run_id": run_id,
    }


def _write_model(settings: Settings, inputs: TrainingInputs, model: Any, meta: dict[str, Any]) -> dict[str, str]:
    """The bundle, the verified ONNX export, meta and class map under ``paths.models``; logged to MLflow."""
    models_dir = settings.path("models")
    bundle_path = save_bundle(models_dir / BUNDLE_FILE, model, meta)
    example = inputs.val.images[:ONNX_EXAMPLE_IMAGES].astype(np.float32)[:, None]
    onnx_path = export.export_onnx(model, models_dir / ONNX_FILE, example)
    write_json(models_dir / META_FILE, meta)
    shutil.copyfile(settings.path("prepared") / CLASSMAP_NAME, models_dir / CLASSMAP_FILE)
    model_uri = tracking.log_model(model, onnx_path, example, models_dir)
    return {"model_uri": model_uri, "bundle": str(bundle_path), "onnx": str(onnx_path)}


def _write_reports(settings: Settings, inputs: TrainingInputs, runs: Sequence[TrainResult],
                   summary: dict[str, Any]) -> None:
    reports_dir, result = settings.path("reports"), runs[0]
    history_path = write_history(reports_dir / "train" / "history.csv", result.history)
    metrics_path = write_json(reports_dir / "train" / "metrics.json", summary)
    curves = plot_training_curves(result.history, result.best_epoch,
                                  reports_dir / "figures" / "training_curves.png",
                                  refit_history=[m for run in runs[1:] for m in run.history],
                                  refit_from_best=settings.train.refit_start == "validated")
    samples = plot_augmented_samples(settings, inputs.train, list(inputs.classmap.chars),
                                     reports_dir / "figures" / "augmented_samples.png")
    tracking.log_epoch(result.best_epoch, {f"best_{key}": value for key, value in result.best.as_dict().items()
                                           if key in ("val_balanced_accuracy", "val_accuracy")})
    tracking.log_metrics({key: value for key, value in summary.items() if key.startswith("val_")})
    tracking.log_files([history_path, metrics_path], "reports")
    tracking.log_files([curves, samples], "figures")


def _resumable_run(checkpoint: Path, marker: Path, run_fingerprint: str) -> str | None:
    """The MLflow run id of an interrupted train stage with the same fingerprint, if there is one."""
    if not (checkpoint.is_file() and marker.is_file()):
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("run_id") if info.get("fingerprint") == run_fingerprint else None
