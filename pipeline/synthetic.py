"""A learnable stand-in for K49 rendered from a real font, in the exact official format, deterministic per
seed; only ``data.dataset: synthetic`` selects it, never a silent fallback."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.contract import GLYPH_SIDE, NPZ_KEY, official_file_names, write_classmap
from pipeline.data import OFFICIAL_CLASSMAPS, write_npz
from pipeline.figures import japanese_font_path

PREFIX = "k49"  # synthetic files carry the K49 names so every later stage treats them alike
CANVAS_SIDE = 64  # render resolution before the downsample to 28x28 (antialiased strokes like K49)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Jitter:
    """Ranges of the per-glyph random variation (uniform draws unless noted)."""

    font_px: tuple[int, ...] = (36, 42, 48, 54)  # font size at CANVAS_SIDE (a few sizes: renders are cached)
    stroke_px: tuple[int, ...] = (0, 1, 2)  # Pillow stroke_width: thin to bold strokes
    rotation_deg: float = 12.0
    shear: float = 0.25  # horizontal shear factor
    aspect: float = 0.15  # independent x/y scale change
    box_px: tuple[int, int] = (20, 27)  # side of the box the ink is fitted into at 28x28
    shift_px: int = 2  # placement jitter around the centre
    blur_radius: tuple[float, float] = (0.0, 0.8)
    ink_level: tuple[float, float] = (0.7, 1.0)  # brush pressure: peak ink intensity factor
    noise_std: float = 6.0  # additive Gaussian noise (0..255 units)


DEFAULT_JITTER = Jitter()
_DRAWS_PER_GLYPH = 11  # uniform numbers consumed by render_glyph (one rng call: fast and reproducible)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(japanese_font_path()), size)


@lru_cache(maxsize=4096)
def _base_render(char: str, size: int, stroke: int) -> Image.Image:
    """The upright glyph on the large canvas; cached because text rendering is the slowest step."""
    canvas = Image.new("L", (CANVAS_SIDE, CANVAS_SIDE), 0)
    centre = CANVAS_SIDE / 2
    ImageDraw.Draw(canvas).text(
        (centre, centre), char, fill=255, font=_font(size), anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    if canvas.getbbox() is None:
        raise ValueError(f"the font {japanese_font_path().name} renders nothing for {char!r}")
    return canvas


def render_glyph(char: str, rng: np.random.Generator, jitter: Jitter = DEFAULT_JITTER) -> np.ndarray:
    """One randomly varied rendering of ``char``: uint8 (28, 28), white ink on black."""
    u = iter(rng.random(_DRAWS_PER_GLYPH).tolist())
    size = jitter.font_px[int(next(u) * len(jitter.font_px))]
    stroke = jitter.stroke_px[int(next(u) * len(jitter.stroke_px))]
    canvas = _base_render(char, size, stroke)
    affine = _affine_inverse(
        angle=math.radians(_between(next(u), -jitter.rotation_deg, jitter.rotation_deg)),
        shear=_between(next(u), -jitter.shear, jitter.shear),
        scale_x=1.0 + _between(next(u), -jitter.aspect, jitter.aspect),
        scale_y=1.0 + _between(next(u), -jitter.aspect, jitter.aspect),
        centre=CANVAS_SIDE / 2,
    )
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR)
    ink = canvas.crop(canvas.getbbox())
    box = round(_between(next(u), *jitter.box_px))
    scale = box / max(ink.size)
    width, height = (max(1, round(side * scale)) for side in ink.size)
    ink = ink.resize((width, height), Image.Resampling.LANCZOS)
    glyph = Image.new("L", (GLYPH_SIDE, GLYPH_SIDE), 0)
    shift = jitter.shift_px
    left, top = _place(GLYPH_SIDE - width, next(u), shift), _place(GLYPH_SIDE - height, next(u), shift)
    glyph.paste(ink, (left, top))
    glyph = glyph.filter(ImageFilter.GaussianBlur(_between(next(u), *jitter.blur_radius)))
    pixels = np.asarray(glyph, dtype=np.float32) * _between(next(u), *jitter.ink_level)
    pixels += rng.normal(0.0, jitter.noise_std, pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _between(unit: float, low: float, high: float) -> float:
    return low + unit * (high - low)


def _affine_inverse(
    angle: float, shear: float, scale_x: float, scale_y: float, centre: float
) -> tuple[float, ...]:
    """Pillow's AFFINE data (output -> input mapping) of scale, shear, then rotation about the centre."""
    cos, sin = math.cos(angle), math.sin(angle)
    # forward = rotation @ [[1, shear], [0, 1]] @ diag(scale_x, scale_y)
    a, b = cos * scale_x, (cos * shear - sin) * scale_y
    c, d = sin * scale_x, (sin * shear + cos) * scale_y
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    return (ia, ib, centre - ia * centre - ib * centre, ic, id_, centre - ic * centre - id_ * centre)


def _place(room: int, unit: float, shift: int) -> int:
    """Top-left offset that centres the ink with a random shift, kept inside the image."""
    if room <= 0:
        return room // 2
    return min(room, max(0, room // 2 + round(_between(unit, -shift, shift))))


def generate(out_dir: Path, train_per_class: int, test_per_class: int, seed: int) -> list[Path]:
    """Write the five K49-format files (train/test images and labels, class map) into ``out_dir``."""
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"synthetic sizes must be >= 1 per class (got train {train_per_class}, test {test_per_class})"
        )
    if seed < 0:
        raise ValueError(f"data.synthetic.seed must be >= 0 (got {seed})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classmap = OFFICIAL_CLASSMAPS[PREFIX]
    names = official_file_names(PREFIX)
    # Independent streams per split, so changing the test size never changes the training images.
    streams = dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(len(SPLITS)), strict=True))
    written = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        rng = np.random.default_rng(streams[split])
        labels = np.repeat(np.arange(len(classmap), dtype=np.uint8), per_class)
        images = np.stack([render_glyph(classmap.chars[label], rng) for label in labels])
        order = rng.permutation(len(labels))  # the official files are not sorted by class either
        written.append(write_npz(out_dir / names[f"{split}_images"], {NPZ_KEY: images[order]}))
        written.append(write_npz(out_dir / names[f"{split}_labels"], {NPZ_KEY: labels[order]}))
    written.append(write_classmap(classmap, out_dir / names["classmap"]))
    return written
