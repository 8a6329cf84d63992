"""SpinalVGG (Kabir et al., IEEE Trans. AI 2023, arXiv:2007.03347): a VGG trunk and the spinal head.
It normalises its raw 0..255 input itself, so training, ONNX and the service feed the same tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.config import Settings
from pipeline.contract import GLYPH_SIDE
from pipeline.transforms import normalize, rotation_grids, sample_views

IN_CHANNELS = 1
# Output channels of each 3x3 conv, grouped by the block that a 2x2 max-pool closes.
CONV_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (256, 256, 256))
FEATURES = CONV_BLOCKS[-1][-1]  # after four pools a 28x28 input is 1x1 spatially
SPINAL_LAYERS = 4


def conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """3x3 convs (padding 1), each followed by BatchNorm and ReLU, then a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def spinal_layer(in_features: int, width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)
    )


class SpinalVGG(nn.Module):
    pixel_mean: torch.Tensor  # buffers, registered in __init__
    pixel_std: torch.Tensor
    temperature: torch.Tensor
    view_grids: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        spinal_width: int = 128,
        dropout: float = 0.5,
        pixel_mean: float = 0.0,
        pixel_std: float = 1.0,
        temperature: float = 1.0,
        tta_rotations_deg: Sequence[float] = (),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SpinalVGG needs at least 2 classes, got num_classes={num_classes}")
        if not pixel_std > 0:
            raise ValueError(f"pixel_std must be > 0 (from the prepared stats.json), got {pixel_std}")
        self.num_classes = num_classes
        self.spinal_width = spinal_width
        self.dropout = dropout
        # Not trainable, but saved in the state_dict and exported to ONNX with the weights.
        self.register_buffer("pixel_mean", torch.tensor(float(pixel_mean)))
        self.register_buffer("pixel_std", torch.tensor(float(pixel_std)))
        # Calibration (pipeline.trust): logits are divided by it; 1 while training. Not in the state_dict
        # (a constructor argument in the bundle), so checkpoints and the refit's start weights ignore it.
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)
        self.register_buffer("view_grids", torch.zeros(0, GLYPH_SIDE, GLYPH_SIDE, 2), persistent=False)
        self.tta_rotations_deg: tuple[float, ...] = ()
        self.set_views(tta_rotations_deg)

        blocks, in_channels = [], IN_CHANNELS
        for widths in CONV_BLOCKS:
            blocks.append(conv_block(in_channels, widths))
            in_channels = widths[-1]
        self.features = nn.Sequential(*blocks)

        self.split_at = FEATURES // 2  # (not `half`: that is nn.Module.half())
        # Layer i sees half A (even i) or half B (odd i), plus layer i-1's output from the second on.
        self.spinal = nn.ModuleList(
            spinal_layer(self._half_width(i) + (spinal_width if i else 0), spinal_width, dropout)
            for i in range(SPINAL_LAYERS)
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(SPINAL_LAYERS * spinal_width, num_classes))

    def _half_width(self, index: int) -> int:
        return self.split_at if index % 2 == 0 else FEATURES - self.split_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (N, 1, 28, 28) in 0..255 -> class logits (N, num_classes). In eval mode with views set,
        the logits are averaged over the rotated views (test-time augmentation, in the ONNX graph too)."""
        views = self.view_grids.shape[0]
        if views and not self.training:
            logits = self._logits(sample_views(x, self.view_grids))
            return logits.unflatten(0, (views, x.shape[0])).mean(0) / self.temperature
        return self._logits(x) / self.temperature

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.pixel_mean, self.pixel_std)
        x = self.features(x).flatten(1)
        a, b = x[:, : self.split_at], x[:, self.split_at :]
        outputs: list[torch.Tensor] = []
        for index, layer in enumerate(self.spinal):
            half = a if index % 2 == 0 else b  # A, B, A, B: the input arrives gradually
            outputs.append(layer(torch.cat([half, outputs[-1]], dim=1) if outputs else half))
        return self.head(torch.cat(outputs, dim=1))

    def calibrate(self, temperature: float) -> SpinalVGG:
        """Bake a fitted temperature into the model (PyTorch, then ONNX, give calibrated logits)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature.fill_(float(temperature))
        return self

    def set_views(self, rotations_deg: Sequence[float]) -> SpinalVGG:
        """Average eval-mode logits over these rotations (degrees; empty = the image alone). Averaging logits,
        not probabilities, keeps the output logits, so the energy score and temperature still apply."""
        self.tta_rotations_deg = tuple(float(angle) for angle in rotations_deg)
        grids = (rotation_grids(self.tta_rotations_deg, GLYPH_SIDE) if self.tta_rotations_deg
                 else torch.zeros(0, GLYPH_SIDE, GLYPH_SIDE, 2))
        self.view_grids = grids.to(self.temperature.device)
        return self

    def config(self) -> dict[str, float | int | list[float]]:
        """Plain constructor arguments (for the model bundle and rebuilding the network)."""
        return {
            "num_classes": self.num_classes,
            "spinal_width": self.spinal_width,
            "dropout": self.dropout,
            "pixel_mean": float(self.pixel_mean),
            "pixel_std": float(self.pixel_std),
            "temperature": float(self.temperature),
            "tta_rotations_deg": list(self.tta_rotations_deg),
        }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(settings: Settings, num_classes: int, pixel_mean: float, pixel_std: float) -> SpinalVGG:
    return SpinalVGG(
        num_classes=num_classes,
        spinal_width=settings.model.spinal_width,
        dropout=settings.model.dropout,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    )
