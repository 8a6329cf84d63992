"""The train stage's reports: the per-epoch history table, the training curves and augmented samples."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline import figures
from pipeline.config import Settings
from pipeline.files import write_text
from pipeline.training.records import EpochMetrics, Labeled
from pipeline.transforms import BatchAugment

AUGMENT_PREVIEW_CLASSES = 8  # columns of the augmented-samples figure (one class each)
AUGMENT_PREVIEW_DRAWS = 3  # augmented rows under the original row


def write_history(path: Path, history: Sequence[EpochMetrics]) -> Path:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(EpochMetrics.__dataclass_fields__), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(m.as_dict() for m in history)
    return write_text(path, table.getvalue())


def plot_training_curves(history: Sequence[EpochMetrics], best_epoch: int, path: Path,
                         refit_history: Sequence[EpochMetrics] = (), refit_from_best: bool = False) -> Path:
    """Train/val loss and val (balanced) accuracy per epoch, the selected epoch marked (and the refit's
    training loss when there was one, drawn after the best epoch when it continued from that model)."""
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
