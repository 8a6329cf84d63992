"""What the training loop hands out and carries between epochs: plain records, no behaviour."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from pipeline.model import SpinalVGG


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN/inf: the learning rate (or another setting) is too aggressive."""


class Labeled(Protocol):
    @property
    def images(self) -> np.ndarray: ...  # uint8 (N, 28, 28)

    @property
    def labels(self) -> np.ndarray: ...  # int (N,)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch: training loss (as optimised), validation loss (plain cross-entropy) and accuracies.

    The validation fields are None in a run without a validation split (the refit on all training data).
    """

    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    val_balanced_accuracy: float | None
    lr: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        """The measured values (a run without validation has no ``val_*`` keys)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class TrainResult:
    model: SpinalVGG  # best weights (EMA if enabled; the last epoch's without validation), CPU, eval mode
    history: list[EpochMetrics]
    best_epoch: int
    best_val_balanced_accuracy: float | None  # None without a validation split
    stopped_early: bool
    device: str = "cpu"

    @property
    def best(self) -> EpochMetrics:
        return self.history[self.best_epoch - 1]


Callback = Callable[[EpochMetrics], None]


@dataclass
class Progress:
    """Loop state beyond the modules: what a checkpoint must carry besides weights and optimiser."""

    epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped_early: bool = False
