"""The refit: after the validated run has chosen the length, train on train + validation and keep the last
epoch, so the shipped model learns from every image (the train stage and the GPU check both call it)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.config import Settings, TrainSettings
from pipeline.data import LabeledImages
from pipeline.training.inputs import TrainingInputs
from pipeline.training.loop import fit
from pipeline.training.records import Callback, TrainResult

log = logging.getLogger(__name__)


def refit(settings: Settings, validated: TrainResult, inputs: TrainingInputs, callbacks: Sequence[Callback] = (),
          checkpoint_path: Path | None = None) -> TrainResult:
    """Continue the validated model (``refit_start: validated``, Goodfellow et al. 7.8, algorithm 7.3) or
    start from fresh weights (``scratch``, 7.2), for ``refit_epochs_fraction`` of the validated run's epochs."""
    cfg = settings.train
    epochs = cfg.refit_epochs(len(validated.history))
    initial = validated.model.state_dict() if cfg.refit_start == "validated" else None
    everything = LabeledImages(np.concatenate([inputs.train.images, inputs.val.images]),
                               np.concatenate([inputs.train.labels, inputs.val.labels]))
    log.info("refit: %d epochs on train + validation (%d images) from %s; the validated run's best was "
             "epoch %d", epochs, len(everything.labels),
             "its model" if initial is not None else "fresh weights", validated.best_epoch)
    return fit(settings.with_overrides({"train.epochs": epochs}), everything, None, inputs.num_classes,
               inputs.pixel_mean, inputs.pixel_std, callbacks=callbacks, checkpoint_path=checkpoint_path,
               initial_weights=initial)


def model_epochs(cfg: TrainSettings, validated: TrainResult, refits: Sequence[TrainResult]) -> int:
    """Epochs behind the exported model: the refit's, after the validated run's best when it continued it."""
    if not refits:
        return validated.best_epoch
    return refits[-1].best_epoch + (validated.best_epoch if cfg.refit_start == "validated" else 0)
