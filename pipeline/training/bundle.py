"""The model bundle (weights + constructor arguments + meta) and batched prediction, on any device."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.files import atomic_path
from pipeline.model import SpinalVGG

BUNDLE_VERSION = 1


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


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_input(images_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) of raw 0..255 values: the model normalises itself."""
    return memory_format(images_uint8.unsqueeze(1).float(), channels_last)


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, batch_size: int, amp: bool, channels_last: bool
                   ) -> Iterable[tuple[slice, torch.Tensor]]:
    """(window, float32 logits) per batch of on-device uint8 ``images``."""
    for start in range(0, len(images), batch_size):
        window = slice(start, start + batch_size)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(to_input(images[window], channels_last))
        yield window, logits.float()


def predict_logits(model: SpinalVGG, images_uint8: np.ndarray, batch_size: int,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """float32 logits (N, num_classes) of uint8 images (N, 28, 28), in eval mode, float32 throughout."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    images = torch.from_numpy(np.ascontiguousarray(images_uint8, dtype=np.uint8)).to(device)
    try:
        parts = [logits.cpu() for _, logits in batched_logits(model, images, batch_size, False, False)]
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.num_classes), dtype=np.float32)


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` through the project's one atomic writer."""
    with atomic_path(Path(path)) as temp:
        torch.save(obj, temp)
    return Path(path)


def save_bundle(path: Path, model: SpinalVGG, meta: dict[str, Any]) -> Path:
    """Write ``model`` (weights + constructor arguments) and plain ``meta`` (e.g. class chars) atomically."""
    bundle = {
        "version": BUNDLE_VERSION,
        "model": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    return save_torch(bundle, Path(path))


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
