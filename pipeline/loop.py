"""The training loop (``fit``), prediction and the model bundle: no stage, no MLflow, no Optuna.

``fit`` keeps the whole uint8 dataset on the training device and slices batches by a seeded permutation
(no DataLoader: 28x28 glyphs are tiny, so Python-side loading would dominate the step), augments each
batch there in one call, and reports every epoch to callbacks. It knows nothing of MLflow or Optuna:
the train stage (``pipeline.train``) plugs tracking in through a callback, the tuner plugs in pruning the
same way.

A checkpoint is written atomically after every epoch with every piece of state that influences what
follows (weights, EMA, optimiser, schedule, RNG states, history, best weights, patience counter). A run
killed at any point and started again with the same settings and data therefore ends exactly where an
uninterrupted one does (on CPU, seeded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pipeline.config import RECIPE_SECTIONS, Settings, TrainSettings
from pipeline.contract import GLYPH_SIDE
from pipeline.model import SpinalVGG, build_model, count_parameters
from pipeline.transforms import BatchAugment

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
BUNDLE_VERSION = 1
# OneCycle: start at lr / 25 and end at lr / (25 * 1e4), the published defaults (Smith & Topin, 2017).
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4
PROGRESS_EVERY = 20  # batches between progress-bar loss updates (each forces a device sync)

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


# --------------------------------------------------------------------------------------------- device


def select_device(pref: str = "auto") -> torch.device:
    """``auto`` = cuda > mps > cpu; an explicit device that is not available is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if pref == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (pref == "cuda" and not cuda) or (pref == "mps" and not mps):
        raise RuntimeError(f"train.device is {pref!r} but no {pref} device is available here; "
                           "set train.device to 'auto' or 'cpu'")
    if pref not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {pref!r}: use auto, cuda, mps or cpu")
    return torch.device(pref)


# ------------------------------------------------------------------------------------- data checks


def _check_split(data: Labeled, name: str, num_classes: int, minimum: int) -> None:
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise TypeError(f"{name}: expected an object with numpy .images and .labels (LabeledImages)")
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (GLYPH_SIDE, GLYPH_SIDE):
        raise ValueError(f"{name} images must be uint8 (N, {GLYPH_SIDE}, {GLYPH_SIDE}); got "
                         f"{images.dtype} {images.shape}. Re-run the prepare stage.")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must be integers shaped ({len(images)},); got {labels.dtype} "
                         f"{labels.shape}")
    if len(images) < minimum:
        raise ValueError(f"{name} has {len(images)} images; training needs at least {minimum} "
                         "(raise train.max_*_per_class or check the prepared data)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name} labels span [{labels.min()}, {labels.max()}] but num_classes is "
                         f"{num_classes}; the class map and the data disagree")


def data_digest(data: Labeled) -> str:
    """Shape + content hash of a split (part of the checkpoint fingerprint)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((data.images.shape, str(data.labels.dtype))).encode())
    digest.update(np.ascontiguousarray(data.images).data)
    digest.update(np.ascontiguousarray(data.labels, dtype=np.int64).data)
    return digest.hexdigest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (a warm start's initial weights, part of the checkpoint fingerprint)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def fingerprint(settings: Settings, train: Labeled, val: Labeled | None, num_classes: int,
                pixel_mean: float, pixel_std: float,
                initial_weights: Mapping[str, torch.Tensor] | None = None) -> str:
    """Hash of everything that decides a run's trajectory: a checkpoint resumes only on a match."""
    relevant = {
        "version": CHECKPOINT_VERSION,
        **settings.run_identity(*RECIPE_SECTIONS),
        "num_classes": num_classes,
        "pixel": [float(pixel_mean), float(pixel_std)],
        "train_data": data_digest(train),
        "val_data": data_digest(val) if val is not None else None,
        "initial_weights": weights_digest(initial_weights) if initial_weights is not None else None,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------- optimiser, schedule


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (the remainder is reshuffled into the next epoch), at least one.

    Equal batch sizes keep BatchNorm statistics sound (a last batch of 1 would fail) and avoid
    recompilation under torch.compile.
    """
    return max(1, n // batch_size)


@dataclass(frozen=True)
class StepPlan:
    """How the recipe meets the data: the batch and learning rate used, and the run's length in steps.

    ``train.batch_size`` and ``train.lr`` are the recipe for large data. A small dataset would get few
    optimiser steps at that batch (6,000 images at 256 = 23 steps an epoch), so the batch is halved until
    an epoch has ``train.min_steps_per_epoch`` steps (never below ``train.min_batch_size``), and the
    learning rate follows the batch linearly (Goyal et al., 2017). Warm-up and the averaging horizon are
    then counted in these steps.
    """

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
    """Decay of the weight average after ``step`` updates: ``(1 + t) / (10 + t)`` capped at ``max_decay``.

    A fixed 0.999 keeps the average mostly at the initial weights for the first thousands of steps, so a
    short run would validate and export a model that learned nothing. Warming the decay up with the step
    count (as timm's ModelEmaV3 does) makes the average cover roughly the last tenth of the steps taken
    until the horizon ``1 / (1 - max_decay)`` is reached: right after the first step and after 50,000.
    """
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


def _epoch_order(labels: torch.Tensor, sample_weights: torch.Tensor | None, generator: torch.Generator
                 ) -> torch.Tensor:
    """Sample indices for one epoch: a permutation, or a class-balanced draw with replacement."""
    if sample_weights is None:
        return torch.randperm(len(labels), generator=generator)
    return torch.multinomial(sample_weights, len(labels), replacement=True, generator=generator)


# -------------------------------------------------------------------------------------- prediction


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _to_input(images_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = images_uint8.unsqueeze(1).float()  # raw 0..255: the model normalises itself
    return _memory_format(x, channels_last)


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch_size: int, amp: bool, channels_last: bool
            ) -> Iterable[tuple[slice, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        window = slice(start, start + batch_size)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(_to_input(images[window], channels_last))
        yield window, logits.float()


def predict_logits(model: SpinalVGG, images_uint8: np.ndarray, batch_size: int,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """float32 logits (N, num_classes) of uint8 images (N, 28, 28), in eval mode, float32 throughout."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    images = torch.from_numpy(np.ascontiguousarray(images_uint8, dtype=np.uint8)).to(device)
    try:
        parts = [logits.cpu() for _, logits in _logits(model, images, batch_size, False, False)]
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.num_classes), dtype=np.float32)


@torch.no_grad()
def _validate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              batch_size: int, amp: bool, channels_last: bool) -> tuple[float, float, float]:
    """(plain cross-entropy, accuracy, balanced accuracy) computed on the device."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=images.device)
    for window, logits in _logits(model, images, batch_size, amp, channels_last):
        target = labels[window]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        confusion += torch.bincount(target * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    matrix = confusion.view(num_classes, num_classes).double()
    support = matrix.sum(1)
    present = support > 0
    # Balanced accuracy = mean recall over the classes present (as sklearn.metrics.balanced_accuracy_score).
    recall = matrix.diagonal()[present] / support[present]
    accuracy = matrix.diagonal().sum() / support.sum()
    return (loss_sum / len(labels)).item(), accuracy.item(), recall.mean().item()


# ------------------------------------------------------------------------------------ checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load_checkpoint(path: Path, expected: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and belongs to this run (fingerprint), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: it cannot be resumed from
        log.warning("checkpoint %s is unreadable (%s: %s); starting fresh", path, type(exc).__name__, exc)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected:
        log.warning("checkpoint %s was made with other settings or data; starting fresh", path)
        return None
    return state


@dataclass
class _Progress:
    """Loop state beyond the modules: what a checkpoint must carry besides weights and optimiser."""

    epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped_early: bool = False


# ---------------------------------------------------------------------------------------- the loop


def load_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, augment: BatchAugment,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a batch from the on-device uint8 dataset and augment it there: (x raw float, y)."""
    return _memory_format(augment(images[index].unsqueeze(1).float()), channels_last), labels[index]


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_weight: torch.Tensor | None, label_smoothing: float, amp: bool) -> torch.Tensor:
    """One optimisation step (bf16 autocast when ``amp``); returns the detached loss (no device sync)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, weight=loss_weight, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def fit(
    settings: Settings,
    train: Labeled,
    val: Labeled | None,
    num_classes: int,
    pixel_mean: float,
    pixel_std: float,
    callbacks: Sequence[Callback] = (),
    checkpoint_path: Path | None = None,
    initial_weights: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train SpinalVGG on ``train``, select on ``val`` balanced accuracy; see the module docstring.

    Without ``val`` (the refit on train + validation, see ``pipeline.train``) there is nothing to select
    on: it trains all ``train.epochs`` epochs, never stops early, and returns the last epoch's weights.
    ``initial_weights`` (a SpinalVGG state dict) warm-starts the model, e.g. the refit continuing from the
    validated run's model; the optimiser, schedule and weight average start afresh.

    Callbacks receive each epoch's :class:`EpochMetrics` after the checkpoint is written; an exception
    they raise (e.g. ``optuna.TrialPruned``) stops training and propagates.
    """
    cfg = settings.train
    _check_split(train, "train", num_classes, minimum=2)
    if val is not None:
        _check_split(val, "val", num_classes, minimum=1)
    device = select_device(cfg.device)
    on_cuda = device.type == "cuda"
    amp, channels_last = cfg.amp and on_cuda, cfg.channels_last and on_cuda

    # One seed drives weight init and dropout (global RNG) and sampling + augmentation (generator).
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = build_model(settings, num_classes, pixel_mean, pixel_std)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_weight_average(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    plan = plan_steps(cfg, len(train.labels))
    optimizer = make_optimizer(cfg, model, plan.lr)
    steps, batch_size = plan.steps_per_epoch, plan.batch_size
    scheduler, per_batch = make_scheduler(cfg, optimizer, plan)
    augment = BatchAugment(settings.augment, generator)

    labels_cpu = torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.int64))
    weights = class_weights(train.labels, num_classes)
    loss_weight = weights.to(device) if cfg.class_balance == "weighted_loss" else None
    sample_weights = weights[labels_cpu].double() if cfg.class_balance == "sampler" else None

    progress = _Progress()
    run_fingerprint = fingerprint(settings, train, val, num_classes, pixel_mean, pixel_std, initial_weights)
    if checkpoint_path is not None:
        state = _load_checkpoint(Path(checkpoint_path), run_fingerprint)
        if state is not None:
            progress = _restore(state, model, ema, optimizer, scheduler, generator)
            log.info("resumed from %s after epoch %d", checkpoint_path, progress.epoch)

    x_train = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
    y_train = labels_cpu.to(device)
    if val is not None:
        x_val = torch.from_numpy(np.ascontiguousarray(val.images)).to(device)
        y_val = torch.from_numpy(np.ascontiguousarray(val.labels, dtype=np.int64)).to(device)
    step_model = cast(nn.Module, torch.compile(model)) if cfg.compile and on_cuda else model
    eval_model = ema.module if ema is not None else model
    log.info("training SpinalVGG (%d parameters) on %s: %d train / %d val images; batch %d, peak lr %.3g, "
             "%d steps/epoch, %d warm-up steps", count_parameters(model), device, len(y_train),
             len(val.labels) if val is not None else 0,
             batch_size, plan.lr, steps, plan.warmup_steps)

    while progress.epoch < cfg.epochs and not progress.stopped_early:
        epoch = progress.epoch + 1
        started = time.perf_counter()
        model.train()
        order = _epoch_order(labels_cpu, sample_weights, generator)
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not sys.stderr.isatty())
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size].to(device, non_blocking=True)
            x, y = load_batch(x_train, y_train, index, augment, channels_last)
            loss = train_step(step_model, x, y, optimizer, loss_weight, cfg.label_smoothing, amp)
            if per_batch:
                scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss
            bar.update()
            if step % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        if not per_batch:
            scheduler.step()

        scores: tuple[float | None, float | None, float | None] = (None, None, None)
        if val is not None:
            scores = _validate(eval_model, x_val, y_val, num_classes, cfg.eval_batch_size, amp, channels_last)
        metrics = EpochMetrics(epoch, (loss_sum / steps).item(), *scores, lr, time.perf_counter() - started)
        if not math.isfinite(metrics.train_loss):
            raise TrainingDiverged(f"training loss is {metrics.train_loss} in epoch {epoch} (train.lr="
                                   f"{cfg.lr}, train.optimizer={cfg.optimizer}): lower train.lr or raise "
                                   "train.warmup_fraction")
        progress.history.append(metrics)
        progress.epoch = epoch
        val_bacc = metrics.val_balanced_accuracy
        if val_bacc is None:  # nothing to select on: the last epoch is the result
            progress.best_epoch = epoch
        elif val_bacc > progress.best_score + cfg.min_delta:
            progress.best_score, progress.best_epoch, progress.since_best = val_bacc, epoch, 0
            progress.best_state = _cpu_copy(eval_model)
        else:
            progress.since_best += 1
        progress.stopped_early = progress.since_best >= cfg.patience and epoch < cfg.epochs
        log.info("epoch %d/%d  train_loss %.4f  %s  lr %.3g  %.1fs", epoch, cfg.epochs, metrics.train_loss,
                 _val_summary(metrics), lr, metrics.seconds)
        if checkpoint_path is not None:
            _atomic_torch_save(_snapshot(run_fingerprint, progress, model, ema, optimizer, scheduler,
                                         generator), Path(checkpoint_path))
        for callback in callbacks:
            callback(metrics)
    if progress.stopped_early:
        log.info("early stop after epoch %d: no val balanced-accuracy gain > %g for %d epochs "
                 "(best: epoch %d)",
                 progress.epoch, cfg.min_delta, cfg.patience, progress.best_epoch)

    best = build_model(settings, num_classes, pixel_mean, pixel_std)
    # A validated run keeps its best epoch's weights; without validation the last epoch's are the result.
    best.load_state_dict(progress.best_state if progress.best_state is not None else _cpu_copy(eval_model))
    best_score = progress.best_score if val is not None else None
    return TrainResult(best.eval(), progress.history, progress.best_epoch, best_score,
                       progress.stopped_early, str(device))


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _val_summary(metrics: EpochMetrics) -> str:
    if metrics.val_balanced_accuracy is None:
        return "(no validation split)"
    return (f"val_loss {metrics.val_loss:.4f}  val_acc {metrics.val_accuracy:.4f}  "
            f"val_bacc {metrics.val_balanced_accuracy:.4f}")


def _snapshot(run_fingerprint: str, progress: _Progress, model: nn.Module, ema: AveragedModel | None,
              optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
              generator: torch.Generator) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": run_fingerprint,
        "epoch": progress.epoch,
        "history": [asdict(m) for m in progress.history],
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "best_state": progress.best_state,
        "since_best": progress.since_best,
        "stopped_early": progress.stopped_early,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore(state: dict[str, Any], model: nn.Module, ema: AveragedModel | None,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
             generator: torch.Generator) -> _Progress:
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return _Progress(
        epoch=state["epoch"],
        history=[EpochMetrics(**m) for m in state["history"]],
        best_score=state["best_score"],
        best_epoch=state["best_epoch"],
        best_state=state["best_state"],
        since_best=state["since_best"],
        stopped_early=state["stopped_early"],
    )


# ------------------------------------------------------------------------------------------ bundle


def save_bundle(path: Path, model: SpinalVGG, meta: dict[str, Any]) -> Path:
    """Write ``model`` (weights + constructor arguments) and plain ``meta`` (e.g. class chars) atomically."""
    bundle = {
        "version": BUNDLE_VERSION,
        "model": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    _atomic_torch_save(bundle, Path(path))
    return Path(path)


def load_bundle(path: Path) -> tuple[SpinalVGG, dict[str, Any]]:
    """(model in eval mode on the CPU, meta with the model's constructor arguments under ``"model"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model bundle; run the train stage (`dvc repro train`)")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
        model = SpinalVGG(**bundle["model"])
        model.load_state_dict(bundle["state_dict"])
    except Exception as exc:
        raise ValueError(f"{path} is not a valid model bundle ({type(exc).__name__}: {exc}); "
                         "re-run the train stage to rewrite it") from exc
    return model.eval(), {**bundle["meta"], "model": dict(bundle["model"])}
