"""How the recipe meets the data: batch and LR plan, optimiser, LR schedule, weight average, class balance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.config import TrainSettings

# OneCycle: start at lr / 25 and end at lr / (25 * 1e4), the published defaults (Smith & Topin, 2017).
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (the remainder is reshuffled into the next epoch), at least one.

    Equal batch sizes keep BatchNorm statistics sound (a last batch of 1 would fail) and avoid
    recompilation under torch.compile.
    """
    return max(1, n // batch_size)


@dataclass(frozen=True)
class StepPlan:
    """How the recipe meets the data: a small dataset halves the batch until an epoch has
    ``train.min_steps_per_epoch`` steps (never under ``min_batch_size``), the LR following the batch
    linearly (Goyal et al., 2017); warm-up and the averaging horizon count these steps."""

    batch_size: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(cfg: TrainSettings, n_train: int) -> StepPlan:
    batch = cfg.batch_size
    while batch // 2 >= cfg.min_batch_size and n_train // batch < cfg.min_steps_per_epoch:
        batch //= 2
    steps = batches_per_epoch(n_train, batch)
    total = cfg.epochs * steps
    warmup = min(round(cfg.warmup_fraction * total), total - 1)
    return StepPlan(batch, cfg.lr * batch / cfg.batch_size, steps, total, warmup)


def ema_decay_at(step: int, max_decay: float) -> float:
    """``(1 + t) / (10 + t)`` capped at ``max_decay`` (as timm's ModelEmaV3): a fixed 0.999 would keep a
    short run's average at the initial weights, so it would validate and export a model that learned nothing."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def make_weight_average(model: nn.Module, max_decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, warmed up per step."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor] | tuple[torch.Tensor, ...],
               current: list[torch.Tensor] | tuple[torch.Tensor, ...], num_averaged: torch.Tensor | int
               ) -> None:
        decay = ema_decay_at(int(num_averaged), max_decay)
        if averaged[0].is_floating_point():  # AveragedModel groups the tensors by dtype
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:  # BatchNorm's batch counters: take the live value
            torch._foreach_copy_(averaged, current)

    # use_buffers=True averages BatchNorm running statistics too, so they match the averaged weights.
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def make_optimizer(cfg: TrainSettings, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters: decaying them only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr or cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr or cfg.lr)


def make_scheduler(cfg: TrainSettings, optimizer: torch.optim.Optimizer, plan: StepPlan
                   ) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The learning-rate schedule and whether it steps per batch (True) or per epoch (False).

    onecycle and cosine are written as one ``LambdaLR`` of the batch index: torch's OneCycleLR divides by
    zero when the warm-up is shorter than two batches, which short tuning trials and tests hit.
    """
    if cfg.schedule == "step":
        step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_every, gamma=cfg.step_gamma)
        return step, False
    total, warmup = plan.total_steps, plan.warmup_steps
    factor = _onecycle_factor if cfg.schedule == "onecycle" else _cosine_factor

    def lr_factor(step: int) -> float:
        return factor(step, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor), True


def _half_cosine(progress: float) -> float:
    """1 -> 0 along half a cosine as ``progress`` goes 0 -> 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _onecycle_factor(step: int, warmup: int, total: int) -> float:
    """Smith & Topin's one-cycle: cosine up from lr/25 to lr, then cosine down to lr/(25 * 1e4)."""
    start = 1.0 / ONECYCLE_DIV_FACTOR
    end = start / ONECYCLE_FINAL_DIV_FACTOR
    if step < warmup:
        return start + (1.0 - start) * (1.0 - _half_cosine(step / warmup))
    return end + (1.0 - end) * _half_cosine((step - warmup) / max(1, total - 1 - warmup))


def _cosine_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to lr over ``warmup`` batches, then cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return _half_cosine((step - warmup) / max(1, total - warmup))


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (an absent class counts as one sample)."""
    counts = np.bincount(labels, minlength=num_classes).clip(min=1).astype(np.float64)
    inverse = 1.0 / counts
    return torch.tensor(inverse / inverse.mean(), dtype=torch.float32)


def epoch_order(labels: torch.Tensor, sample_weights: torch.Tensor | None, generator: torch.Generator
                ) -> torch.Tensor:
    """Sample indices for one epoch: a permutation, or a class-balanced draw with replacement."""
    if sample_weights is None:
        return torch.randperm(len(labels), generator=generator)
    return torch.multinomial(sample_weights, len(labels), replacement=True, generator=generator)
