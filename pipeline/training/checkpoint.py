"""Per-epoch checkpoints: a run killed anywhere and started again with the same settings and data ends
exactly where an uninterrupted one does, because every piece of state that shapes what follows is saved."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.config import RECIPE_SECTIONS, Settings
from pipeline.training.bundle import save_torch
from pipeline.training.records import EpochMetrics, Labeled, Progress

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class Trainable:
    """The stateful objects of one run, saved and restored together."""

    model: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator


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


def load(path: Path, expected: str) -> dict[str, Any] | None:
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


def save(path: Path, run_fingerprint: str, progress: Progress, run: Trainable) -> None:
    save_torch({
        "version": CHECKPOINT_VERSION,
        "fingerprint": run_fingerprint,
        "epoch": progress.epoch,
        "history": [asdict(m) for m in progress.history],
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "best_state": progress.best_state,
        "since_best": progress.since_best,
        "stopped_early": progress.stopped_early,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "generator": run.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, path)


def restore(state: dict[str, Any], run: Trainable) -> Progress:
    run.model.load_state_dict(state["model"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(
        epoch=state["epoch"],
        history=[EpochMetrics(**m) for m in state["history"]],
        best_score=state["best_score"],
        best_epoch=state["best_epoch"],
        best_state=state["best_state"],
        since_best=state["since_best"],
        stopped_early=state["stopped_early"],
    )
