"""The train stage: fit SpinalVGG on the prepared split with the tuned values applied, validated on the
held-out split (early stopping, the reported validation scores); then, with ``train.refit``, train on
train + validation (by default continuing from the validated model); write the model bundle, its
verified ONNX export, reports and figures, all tracked in one MLflow run.

Tuned values (``models/best_params.yaml`` from the tune stage) are applied here, under the values set on
the command line: defaults < profile < tuned < command line (``pipeline.config.explicit_keys``).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Settings, TrainSettings, explicit_keys
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
    TrainRun,
    read_best_params,
)
from pipeline.data import LabeledImages
from pipeline.files import write_json
from pipeline.loop import EpochMetrics, Labeled, TrainResult, fingerprint, fit, save_bundle
from pipeline.model import count_parameters
from pipeline.transforms import BatchAugment

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "train.pt"
REFIT_CHECKPOINT_FILE = "refit.pt"  # the refit on train + validation resumes from its own checkpoint
CHECKPOINT_RUN_FILE = "train_run.json"  # next to the checkpoint: the MLflow run a resumed stage continues
ONNX_EXAMPLE_IMAGES = 8  # validation images used to trace and verify the ONNX export
AUGMENT_PREVIEW_CLASSES = 8  # columns of the augmented-samples figure (one class each)
AUGMENT_PREVIEW_DRAWS = 3  # augmented rows under the original row


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


# -------------------------------------------------------------------------------- the train stage


def run(settings: Settings) -> dict[str, Any]:
    """Train stage: fit on the prepared split, write model/ONNX/reports/figures, track it all in MLflow."""
    from pipeline import data, export, tracking  # the stage's collaborators; fit() needs none of them

    settings = apply_tuned(settings)
    train, val = data.load_prepared(settings, "train"), data.load_prepared(settings, "val")
    if settings.train.max_train_per_class:
        train = data.subset_per_class(train, settings.train.max_train_per_class, settings.seed)
    if settings.train.max_val_per_class:
        val = data.subset_per_class(val, settings.train.max_val_per_class, settings.seed)
    stats = data.read_stats(settings)
    classmap_path = settings.path("prepared") / data.CLASSMAP_NAME
    classmap = data.load_classmap(classmap_path)
    num_classes = len(classmap)
    mean, std = float(stats["pixel_mean"]), float(stats["pixel_std"])

    models_dir, reports_dir = settings.path("models"), settings.path("reports")
    checkpoint = settings.path("checkpoints") / CHECKPOINT_FILE
    run_marker = checkpoint.with_name(CHECKPOINT_RUN_FILE)
    run_fingerprint = fingerprint(settings, train, val, num_classes, mean, std)
    resume_id = _resumable_run(checkpoint, run_marker, run_fingerprint)

    with tracking.start_run(settings, "train", run_id=resume_id) as active:
        run_id = active.info.run_id
        write_json(run_marker, {"run_id": run_id, "fingerprint": run_fingerprint})
        if resume_id is None:  # params are immutable in MLflow: a resumed run already has them
            tracking.log_settings(settings)
            tracking.log_dataset(settings, {"train": len(train.labels), "val": len(val.labels)})

        def log_epoch(metrics: EpochMetrics) -> None:
            values = metrics.as_dict()
            tracking.log_epoch(int(values.pop("epoch")), values)

        result = fit(settings, train, val, num_classes, mean, std, callbacks=[log_epoch],
                     checkpoint_path=checkpoint)
        runs = [result]  # the validated run, then the refit when there is one: the last is exported
        if settings.train.refit:
            runs.append(refit(settings, result, train, val, num_classes, mean, std))
        final = runs[-1]

        best = result.best
        summary = {
            "best_epoch": result.best_epoch,
            "best_val_balanced_accuracy": best.val_balanced_accuracy,
            "best_val_accuracy": best.val_accuracy,
            "best_val_loss": best.val_loss,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "n_train": len(train.labels),
            "n_val": len(val.labels),
            "refit": settings.train.refit,
            # The exported model's training length: the validated run's best epoch, plus or (refit from
            # scratch) instead of the refit's epochs on train + val.
            "model_epochs": model_epochs(settings.train, result, runs[1:]),
            "model_train_images": len(train.labels) + (len(val.labels) if settings.train.refit else 0),
            "num_classes": num_classes,
            "parameters": count_parameters(final.model),
            "device": final.device,
            "train_seconds": round(sum(m.seconds for run in runs for m in run.history), 3),
        }
        meta = {
            "architecture": "SpinalVGG",
            "dataset": settings.data.dataset,
            "classes": list(classmap.chars),
            "codepoints": list(classmap.codepoints),
            "image_side": GLYPH_SIDE,
            "input": {"name": ONNX_INPUT, "dtype": "float32",
                      "shape": ["batch", 1, GLYPH_SIDE, GLYPH_SIDE], "range": [0, 255],
                      "polarity": "white ink on black"},
            "output": {"name": ONNX_OUTPUT, "kind": "logits"},
            "pixel_mean": mean,
            "pixel_std": std,
            "best_val_balanced_accuracy": best.val_balanced_accuracy,
            "refit": summary["refit"],
            "run_id": run_id,
        }
        bundle_path = save_bundle(models_dir / BUNDLE_FILE, final.model, meta)
        example = val.images[:ONNX_EXAMPLE_IMAGES].astype(np.float32)[:, None]
        # The model bundle (pipeline.contract): what tracking.log_model logs and serving reads.
        onnx_path = export.export_onnx(final.model, models_dir / ONNX_FILE, example)
        write_json(models_dir / META_FILE, meta)
        shutil.copyfile(classmap_path, models_dir / CLASSMAP_FILE)

        history_path = _write_history(reports_dir / "train" / "history.csv", result.history)
        metrics_path = write_json(reports_dir / "train" / "metrics.json", summary)
        curves = plot_training_curves(result.history, result.best_epoch,
                                      reports_dir / "figures" / "training_curves.png",
                                      refit_history=[m for run in runs[1:] for m in run.history],
                                      refit_from_best=settings.train.refit_start == "validated")
        samples = plot_augmented_samples(settings, train, list(classmap.chars),
                                         reports_dir / "figures" / "augmented_samples.png")
        tracking.log_epoch(result.best_epoch, {f"best_{key}": value for key, value in best.as_dict().items()
                                               if key in ("val_balanced_accuracy", "val_accuracy")})
        tracking.log_files([history_path, metrics_path], "reports")
        tracking.log_files([curves, samples], "figures")
        model_uri = tracking.log_model(final.model, onnx_path, example, models_dir)
        record = TrainRun(run_id, active.info.experiment_id, tracking.redact(tracking.tracking_uri(settings)))
        record.write(models_dir / TRAIN_RUN_FILE)

    # Finished and recorded: a later run (e.g. after a code change) must train afresh, not resume.
    checkpoint.unlink(missing_ok=True)
    checkpoint.with_name(REFIT_CHECKPOINT_FILE).unlink(missing_ok=True)
    run_marker.unlink(missing_ok=True)
    return {**summary, **asdict(record), "model_uri": model_uri, "bundle": str(bundle_path), "onnx": str(onnx_path)}


def refit(settings: Settings, validated: TrainResult, train: LabeledImages, val: LabeledImages,
          num_classes: int, pixel_mean: float, pixel_std: float) -> TrainResult:
    """Train on train + validation and keep the last epoch: the model shipped learns from every image.

    The validated run chose the recipe's length (early stopping) and showed what it reaches on images it
    never saw. The refit then either continues from that run's model (``train.refit_start: validated``,
    Goodfellow et al., Deep Learning, section 7.8, algorithm 7.3) or trains fresh weights (``scratch``,
    algorithm 7.2), for ``train.refit_epochs_fraction`` of the validated run's epochs, with a fresh
    optimiser, schedule and weight average. On kmnist-dev the 10 % held out for validation cost a point of
    test accuracy (README, "Measured on real data"). The test set still plays no part. Runs inside the train
    stage's MLflow run: its epochs are logged as ``refit_*`` metrics.
    """
    from pipeline import tracking

    cfg = settings.train
    epochs = cfg.refit_epochs(len(validated.history))
    initial = validated.model.state_dict() if cfg.refit_start == "validated" else None
    everything = LabeledImages(np.concatenate([train.images, val.images]),
                               np.concatenate([train.labels, val.labels]))
    log.info("refit: %d epochs on train + validation (%d images) from %s; the validated run's best was "
             "epoch %d", epochs, len(everything.labels),
             "its model" if initial is not None else "fresh weights", validated.best_epoch)

    def log_epoch(metrics: EpochMetrics) -> None:
        values = metrics.as_dict()
        tracking.log_epoch(int(values.pop("epoch")), {f"refit_{key}": value for key, value in values.items()})

    return fit(settings.with_overrides({"train.epochs": epochs}), everything, None, num_classes, pixel_mean,
               pixel_std, callbacks=[log_epoch],
               checkpoint_path=settings.path("checkpoints") / REFIT_CHECKPOINT_FILE, initial_weights=initial)


def model_epochs(cfg: TrainSettings, validated: TrainResult, refits: Sequence[TrainResult]) -> int:
    """Epochs behind the exported model: the refit's, after the validated run's best when it continued it."""
    if not refits:
        return validated.best_epoch
    return refits[-1].best_epoch + (validated.best_epoch if cfg.refit_start == "validated" else 0)


def _resumable_run(checkpoint: Path, marker: Path, run_fingerprint: str) -> str | None:
    """The MLflow run id of an interrupted train stage with the same fingerprint, if there is one."""
    if not (checkpoint.is_file() and marker.is_file()):
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info.get("run_id") if info.get("fingerprint") == run_fingerprint else None




def _write_history(path: Path, history: Sequence[EpochMetrics]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(EpochMetrics.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(m.as_dict() for m in history)
    return path


def plot_training_curves(history: Sequence[EpochMetrics], best_epoch: int, path: Path,
                         refit_history: Sequence[EpochMetrics] = (), refit_from_best: bool = False) -> Path:
    """Train/val loss and val (balanced) accuracy per epoch, the selected epoch marked (and the refit's
    training loss when there was one, drawn after the best epoch when it continued from that model)."""
    from pipeline import figures

    epochs = [m.epoch for m in history]
    refit_offset = best_epoch if refit_from_best else 0  # a continued refit starts from the best epoch's model
    fig, ax = figures.new_figure(8.0, 4.5)
    ax.plot(epochs, [m.train_loss for m in history], label="train loss (as optimised)", color="tab:blue")
    ax.plot(epochs, [m.val_loss for m in history], label="val loss (cross-entropy)", color="tab:orange")
    if refit_history:
        ax.plot([refit_offset + m.epoch for m in refit_history], [m.train_loss for m in refit_history],
                label="refit train loss (train + val)", color="tab:purple", linestyle="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    acc_ax = ax.twinx()
    acc_ax.plot(epochs, [m.val_balanced_accuracy for m in history], label="val balanced accuracy",
                color="tab:green")
    acc_ax.plot(epochs, [m.val_accuracy for m in history], label="val accuracy", color="tab:green",
                linestyle=":")
    acc_ax.set_ylabel("accuracy")
    ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
    handles = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.set_title("SpinalVGG training")
    return figures.save_figure(fig, path)


def plot_augmented_samples(settings: Settings, train: Labeled, chars: Sequence[str], path: Path) -> Path:
    """One training glyph per class (first row) and augmented draws of it below, as the loop sees them."""
    from pipeline import figures

    classes = np.unique(train.labels)[:AUGMENT_PREVIEW_CLASSES]
    originals = np.stack([train.images[np.flatnonzero(train.labels == c)[0]] for c in classes])
    augment = BatchAugment(settings.augment, torch.Generator().manual_seed(settings.seed))
    batch = torch.from_numpy(originals).unsqueeze(1).float()
    draws = [augment(batch).squeeze(1).clamp(0, 255).round().to(torch.uint8).numpy()
             for _ in range(AUGMENT_PREVIEW_DRAWS)]
    grid = np.concatenate([originals, *draws])
    titles = [chars[c] for c in classes] + ["aug"] * (len(classes) * AUGMENT_PREVIEW_DRAWS)
    return figures.save_image_grid(grid, titles, path, columns=len(classes),
                                   suptitle="first row: original; below: training augmentation")
