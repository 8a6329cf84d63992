"""Images that are not kana, made on this machine without a download: the out-of-distribution sets the
"not a kana" threshold is measured against (never fitted on). Deterministic per seed."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from pipeline.contract import GLYPH_SIDE
from pipeline.imaging import ImageError, to_glyph
from pipeline.synthetic import render_glyph

LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# Common kanji (first school years): Japanese script, yet none of the kana classes.
KANJI = ("一二三四五六七八九十百千万円人日月火水木金土山川田口目耳手足上下中大小本学生年先気雨白"
         "天空花草林森竹石糸王玉虫犬貝車町村名字文音早正立休入出見行来東西南北校会社何時間国語話")
PAD_SIDE = 280  # the page's writing pad, and its stroke width (page.js STROKE_RATIO)
PAD_STROKE = PAD_SIDE // 12
RENDERS = {"latin_letters": 4, "rendered_digits": 10, "kanji": 2}  # variants per character
SKLEARN_DIGIT_MAX = 16.0  # load_digits' pixel scale
STROKES, NOISE, BLANK = 300, 200, 8


def sklearn_digits() -> np.ndarray:
    """scikit-learn's bundled 8x8 handwritten digits (1,797), framed the way an upload is (pipeline.imaging)."""
    from sklearn.datasets import load_digits

    images = load_digits().images * (255.0 / SKLEARN_DIGIT_MAX)  # already light ink on dark
    return np.stack([to_glyph(image) for image in images])


def rendered(chars: str, per_char: int, rng: np.random.Generator) -> np.ndarray:
    """Each character of ``chars`` rendered ``per_char`` times from the project's font, varied like K49."""
    return np.stack([render_glyph(char, rng) for char in chars for _ in range(per_char)])


def single_strokes(count: int, rng: np.random.Generator) -> np.ndarray:
    """One pen stroke each (a line or an arc) written on the page's pad, read as the service reads it."""
    glyphs: list[np.ndarray] = []
    while len(glyphs) < count:
        pad = Image.new("L", (PAD_SIDE, PAD_SIDE), 0)
        draw = ImageDraw.Draw(pad)
        points = _arc(rng) if rng.random() < 0.5 else _line(rng)
        draw.line(points, fill=255, width=PAD_STROKE, joint="curve")
        try:
            glyphs.append(to_glyph(np.asarray(pad, dtype=np.float32)))
        except ImageError:  # a degenerate stroke outside the pad: draw another
            continue
    return np.stack(glyphs)


def _line(rng: np.random.Generator) -> list[tuple[float, float]]:
    """A straight stroke at least a third of the pad long (a person's stroke, not a dot)."""
    while True:
        start, end = rng.uniform(0.15, 0.85, 2) * PAD_SIDE, rng.uniform(0.15, 0.85, 2) * PAD_SIDE
        if np.hypot(*(end - start)) >= PAD_SIDE / 3:
            return [(float(start[0]), float(start[1])), (float(end[0]), float(end[1]))]


def _arc(rng: np.random.Generator) -> list[tuple[float, float]]:
    centre, radius = rng.uniform(0.35, 0.65, 2) * PAD_SIDE, rng.uniform(0.15, 0.35) * PAD_SIDE
    begin, sweep = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.5) * math.pi
    angles = begin + np.linspace(0.0, sweep, 24)
    return [(centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a)) for a in angles]


def noise(count: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise (half) and sparse speckle (half): no strokes at all."""
    dense = rng.integers(0, 256, (count // 2, GLYPH_SIDE, GLYPH_SIDE))
    sparse = np.where(rng.random((count - count // 2, GLYPH_SIDE, GLYPH_SIDE)) < 0.1, 255, 0)
    return np.concatenate([dense, sparse]).astype(np.uint8)


def blank(count: int) -> np.ndarray:
    """Flat dark images (the service refuses them before the model; here: what the model alone would say)."""
    levels = np.linspace(0, 7, count).round()
    return np.broadcast_to(levels[:, None, None], (count, GLYPH_SIDE, GLYPH_SIDE)).astype(np.uint8)


def nonkana_sets(seed: int) -> dict[str, np.ndarray]:
    """Every non-kana set by name: uint8 (N, 28, 28), white ink on black like the dataset."""
    streams = iter(np.random.SeedSequence(seed).spawn(5))
    makers: dict[str, Callable[[], np.ndarray]] = {
        "sklearn_digits": sklearn_digits,
        "latin_letters": lambda: rendered(LATIN, RENDERS["latin_letters"], np.random.default_rng(next(streams))),
        "rendered_digits": lambda: rendered(DIGITS, RENDERS["rendered_digits"],
                                            np.random.default_rng(next(streams))),
        "kanji": lambda: rendered(KANJI, RENDERS["kanji"], np.random.default_rng(next(streams))),
        "single_strokes": lambda: single_strokes(STROKES, np.random.default_rng(next(streams))),
        "noise": lambda: noise(NOISE, np.random.default_rng(next(streams))),
        "blank": lambda: blank(BLANK),
    }
    return {name: make() for name, make in makers.items()}
