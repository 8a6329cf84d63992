"""The training loop: ``fit`` trains SpinalVGG, selects the best epoch on validation and reports each
epoch to callbacks (the train stage plugs MLflow in, the tuner Optuna pruning); no stage, MLflow or Optuna.
The uint8 dataset stays on the device and batches are sliced by a seeded permutation: no DataLoader."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import Settings, TrainSettings
from pipeline.contract import GLYPH_SIDE
from pipeline.model import build_model, count_parameters
from pipeline.training import checkpoint
from pipeline.training.bundle import batched_logits, memory_format, select_device
from pipeline.training.checkpoint import Trainable
from pipeline.training.plan import (
    StepPlan,
    class_weights,
    epoch_order,
    make_optimizer,
    make_scheduler,
    make_weight_average,
    plan_steps,
)
from pipeline.training.records import Callback, EpochMetrics, Labeled, Progress, TrainingDiverged, TrainResult
from pipeline.transforms import BatchAugment

log = logging.getLogger(__name__)

PROGRESS_EVERY = 20  # batches between progress-bar loss updates (each forces a device sync)


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


@dataclass(frozen=True)
class Speed:
    """How the step runs on this device: bf16 autocast, channels-last tensors, torch.compile."""

    amp: bool
    channels_last: bool
    compile: bool


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU multiplies bf16 natively (elsewhere bf16 is emulated, slower than fp32)."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_speed(cfg: TrainSettings, device: torch.device) -> Speed:
    """``train.amp``, ``train.channels_last`` and ``train.compile`` as they apply on ``device``: bf16 autocast
    on CUDA and on CPUs with native bf16, channels-last on CUDA and CPU, compile on CUDA (benchmarks/TRAIN.md)."""
    on_cuda, on_cpu = device.type == "cuda", device.type == "cpu"
    return Speed(cfg.amp and (on_cuda or (on_cpu and cpu_has_native_bf16())),
                 cfg.channels_last and (on_cuda or on_cpu), cfg.compile and on_cuda)


def load_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, augment: BatchAugment,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a batch from the on-device uint8 dataset and augment it there: (x raw float, y)."""
    return memory_format(augment(images[index].unsqueeze(1).float()), channels_last), labels[index]


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


@torch.no_grad()
def validate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch_size: int, amp: bool, channels_last: bool) -> tuple[float, float, float]:
    """(plain cross-entropy, accuracy, balanced accuracy) computed on the device."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=images.device)
    for window, logits in batched_logits(model, images, batch_size, amp, channels_last):
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


@dataclass
class _Setup:
    """Everything one run trains with, built once in a fixed order (the seeded RNG draws depend on it)."""

    state: Trainable
    plan: StepPlan
    per_batch: bool
    augment: BatchAugment
    device: torch.device
    speed: Speed
    labels_cpu: torch.Tensor
    loss_weight: torch.Tensor | None
    sample_weights: torch.Tensor | None


def _setup(settings: Settings, train: Labeled, num_classes: int, pixel_mean: float, pixel_std: float,
           initial_weights: Mapping[str, torch.Tensor] | None) -> _Setup:
    cfg = settings.train
    device = select_device(cfg.device)
    speed = resolve_speed(cfg, device)
    # One seed drives weight init and dropout (global RNG) and sampling + augmentation (generator).
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = build_model(settings, num_classes, pixel_mean, pixel_std)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    model = model.to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_weight_average(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    plan = plan_steps(cfg, len(train.labels))
    optimizer = make_optimizer(cfg, model, plan.lr)
    scheduler, per_batch = make_scheduler(cfg, optimizer, plan)
    augment = BatchAugment(settings.augment, generator)
    labels_cpu = torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.int64))
    weights = class_weights(train.labels, num_classes)
    return _Setup(
        Trainable(model, ema, optimizer, scheduler, generator), plan, per_batch, augment, device,
        speed, labels_cpu,
        weights.to(device) if cfg.class_balance == "weighted_loss" else None,
        weights[labels_cpu].double() if cfg.class_balance == "sampler" else None,
    )


def _train_epoch(run: _Setup, step_model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                 settings: Settings, epoch: int) -> tuple[float, float]:
    """One pass over the plan's steps: (mean training loss, learning rate at the epoch's last step)."""
    cfg, state, plan, speed = settings.train, run.state, run.plan, run.speed
    state.model.train()
    order = epoch_order(run.labels_cpu, run.sample_weights, state.generator)
    loss_sum = torch.zeros((), device=run.device)
    bar = tqdm(total=plan.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               disable=not sys.stderr.isatty())
    for step in range(plan.steps_per_epoch):
        index = order[step * plan.batch_size:(step + 1) * plan.batch_size].to(run.device, non_blocking=True)
        x, y = load_batch(x_train, y_train, index, run.augment, speed.channels_last)
        loss = train_step(step_model, x, y, state.optimizer, run.loss_weight, cfg.label_smoothing, speed.amp)
        if run.per_batch:
            state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        loss_sum += loss
        bar.update()
        if step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{state.optimizer.param_groups[0]['lr']:.3g}")
    bar.close()
    lr = state.optimizer.param_groups[0]["lr"]
    if not run.per_batch:
        state.scheduler.step()
    return (loss_sum / plan.steps_per_epoch).item(), lr


def _select(progress: Progress, metrics: EpochMetrics, eval_model: nn.Module, settings: Settings) -> None:
    """Record the epoch; keep the best weights by validation balanced accuracy; decide on early stopping."""
    cfg = settings.train
    progress.history.append(metrics)
    progress.epoch = metrics.epoch
    val_bacc = metrics.val_balanced_accuracy
    if val_bacc is None:  # nothing to select on: the last epoch is the result
        progress.best_epoch = metrics.epoch
    elif val_bacc > progress.best_score + cfg.min_delta:
        progress.best_score, progress.best_epoch, progress.since_best = val_bacc, metrics.epoch, 0
        progress.best_state = _cpu_copy(eval_model)
    else:
        progress.since_best += 1
    progress.stopped_early = progress.since_best >= cfg.patience and metrics.epoch < cfg.epochs


def _time_left(history: Sequence[EpochMetrics], epochs: int) -> str:
    """``, ~N min left`` for the epochs still to run at the mean epoch time so far (early stopping ends sooner)."""
    left = epochs - history[-1].epoch
    if left <= 0:
        return ""
    seconds = left * sum(m.seconds for m in history) / len(history)
    return f", ~{max(1, round(seconds / 60))} min left ({left} epoch{'s' if left > 1 else ''})"


def _on_device(data: Labeled, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
    return images, torch.from_numpy(np.ascontiguousarray(data.labels, dtype=np.int64)).to(device)


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
    """Train on ``train`` and select on ``val``; without ``val`` (the refit) train every epoch and return
    the last. ``initial_weights`` warm-starts the model (optimiser, schedule and average start afresh);
    a callback's exception (e.g. ``optuna.TrialPruned``) stops training and propagates."""
    cfg = settings.train
    _check_split(train, "train", num_classes, minimum=2)
    if val is not None:
        _check_split(val, "val", num_classes, minimum=1)
    run = _setup(settings, train, num_classes, pixel_mean, pixel_std, initial_weights)
    state = run.state
    progress = Progress()
    run_fingerprint = checkpoint.fingerprint(settings, train, val, num_classes, pixel_mean, pixel_std,
                                             initial_weights)
    if checkpoint_path is not None and (saved := checkpoint.load(Path(checkpoint_path), run_fingerprint)):
        progress = checkpoint.restore(saved, state)
        log.info("resumed from %s after epoch %d", checkpoint_path, progress.epoch)
    x_train, y_train = _on_device(train, run.device)
    x_val, y_val = _on_device(val, run.device) if val is not None else (None, None)
    step_model = cast(nn.Module, torch.compile(state.model)) if run.speed.compile else state.model
    eval_model = state.ema.module if state.ema is not None else state.model
    log.info("training SpinalVGG (%d parameters) on %s: %d train / %d val images; batch %d, peak lr %.3g, "
             "%d steps/epoch, %d warm-up steps", count_parameters(state.model), run.device, len(y_train),
             len(val.labels) if val is not None else 0, run.plan.batch_size, run.plan.lr,
             run.plan.steps_per_epoch, run.plan.warmup_steps)
    while progress.epoch < cfg.epochs and not progress.stopped_early:
        epoch, started = progress.epoch + 1, time.perf_counter()
        train_loss, lr = _train_epoch(run, step_model, x_train, y_train, settings, epoch)
        scores: tuple[float | None, float | None, float | None] = (None, None, None)
        if x_val is not None and y_val is not None:
            scores = validate(eval_model, x_val, y_val, num_classes, cfg.eval_batch_size, run.speed.amp,
                              run.speed.channels_last)
        metrics = EpochMetrics(epoch, train_loss, *scores, lr, time.perf_counter() - started)
        if not math.isfinite(metrics.train_loss):
            raise TrainingDiverged(f"training loss is {metrics.train_loss} in epoch {epoch} (train.lr="
                                   f"{cfg.lr}, train.optimizer={cfg.optimizer}): lower train.lr or raise "
                                   "train.warmup_fraction")
        _select(progress, metrics, eval_model, settings)
        log.info("epoch %d/%d  train_loss %.4f  %s  lr %.3g  %.1fs%s", epoch, cfg.epochs, metrics.train_loss,
                 _val_summary(metrics), lr, metrics.seconds, _time_left(progress.history, cfg.epochs))
        if checkpoint_path is not None:
            checkpoint.save(Path(checkpoint_path), run_fingerprint, progress, state)
        for callback in callbacks:
            callback(metrics)
    return _result(settings, progress, eval_model, num_classes, pixel_mean, pixel_std, val is not None,
                   str(run.device))


def _result(settings: Settings, progress: Progress, eval_model: nn.Module, num_classes: int,
            pixel_mean: float, pixel_std: float, validated: bool, device: str) -> TrainResult:
    cfg = settings.train
    if progress.stopped_early:
        log.info("early stop after epoch %d: no val balanced-accuracy gain > %g for %d epochs "
                 "(best: epoch %d)", progress.epoch, cfg.min_delta, cfg.patience, progress.best_epoch)
    best = build_model(settings, num_classes, pixel_mean, pixel_std)
    # A validated run keeps its best epoch's weights; without validation the last epoch's are the result.
    best.load_state_dict(progress.best_state if progress.best_state is not None else _cpu_copy(eval_model))
    return TrainResult(best.eval(), progress.history, progress.best_epoch,
                       progress.best_score if validated else None, progress.stopped_early, device)


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _val_summary(metrics: EpochMetrics) -> str:
    if metrics.val_balanced_accuracy is None:
        return "(no validation split)"
    return (f"val_loss {metrics.val_loss:.4f}  val_acc {metrics.val_accuracy:.4f}  "
            f"val_bacc {metrics.val_balanced_accuracy:.4f}")
