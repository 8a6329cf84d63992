"""pipeline.imaging: uploads of any kind become dataset-like 28x28 glyphs; bad ones get clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.imaging import GLYPH_SIDE, ImageError, ImageLimits, decode_gray, load_glyph, to_glyph
from tests import bad_inputs

LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=16_000_000)
CHAR = "ぬ"


def dataset_glyph(char: str = CHAR) -> np.ndarray:
    """A glyph in the dataset's own format: uint8 28x28, white strokes on black, a little noise."""
    rng = np.random.default_rng(0)
    ink = bad_inputs.ink(char, side=GLYPH_SIDE, font_frac=0.85)
    return np.clip(ink * rng.uniform(0.8, 1.0) + rng.normal(0, 3, ink.shape), 0, 255).astype(np.uint8)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def test_dataset_image_passes_through_unchanged():
    glyph = dataset_glyph()
    png = bad_inputs.encode(Image.fromarray(glyph))
    assert np.array_equal(load_glyph(png, LIMITS), glyph)


def test_inverted_dataset_image_gives_the_same_glyph():
    glyph = dataset_glyph()
    inverted = bad_inputs.encode(Image.fromarray(255 - glyph))
    assert np.array_equal(load_glyph(inverted, LIMITS), glyph)


def test_scan_and_its_negative_give_the_same_glyph():
    scan = load_glyph(bad_inputs.scan_png(CHAR), LIMITS)
    negative = bad_inputs.ink(CHAR).astype(np.uint8)
    assert np.array_equal(scan, load_glyph(bad_inputs.encode(Image.fromarray(negative)), LIMITS))
    assert scan.dtype == np.uint8 and scan.shape == (GLYPH_SIDE, GLYPH_SIDE)


def test_large_drawing_is_framed_like_the_dataset():
    glyph = load_glyph(bad_inputs.scan_png(CHAR, side=300), LIMITS)
    assert glyph.max() == 255 and glyph[0].max() == 0 and glyph[-1].max() == 0  # white ink, dark margins
    rows, cols = np.nonzero(glyph > 50)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 20  # fills most of the frame
    # Close to a dataset-style rendering of the same character.
    assert correlation(glyph, dataset_glyph()) > 0.6


def test_scale_and_off_centre_placement_do_not_matter():
    small = bad_inputs.ink(CHAR, side=80)
    page = np.zeros((400, 600), dtype=np.float32)
    page[250:330, 60:140] = small  # a small character far from the centre of a large page
    placed = to_glyph(255 - page)
    centred = load_glyph(bad_inputs.scan_png(CHAR, side=80), LIMITS)
    assert correlation(placed, centred) > 0.97


@pytest.mark.parametrize("name", sorted(bad_inputs.ODD_BUT_VALID))
def test_unusual_modes_and_formats_match_a_plain_scan(name):
    reference = load_glyph(bad_inputs.scan_png(CHAR), LIMITS)
    glyph = load_glyph(bad_inputs.ODD_BUT_VALID[name](CHAR), LIMITS)
    assert glyph.shape == (GLYPH_SIDE, GLYPH_SIDE) and glyph.dtype == np.uint8
    assert correlation(glyph, reference) > 0.9, name


def test_animated_gif_uses_the_first_frame():
    first = load_glyph(bad_inputs.animated_gif("あ", "ん"), LIMITS)
    assert correlation(first, load_glyph(bad_inputs.scan_png("あ"), LIMITS)) > 0.9
    assert correlation(first, load_glyph(bad_inputs.scan_png("ん"), LIMITS)) < 0.7


def test_gray_scan_background_is_removed():
    paper = 200 - bad_inputs.ink(CHAR) * (150 / 255)  # gray paper (200) with gray ink (50)
    glyph = to_glyph(paper)
    assert glyph.min() == 0 and glyph.max() == 255
    assert correlation(glyph, load_glyph(bad_inputs.scan_png(CHAR), LIMITS)) > 0.97


@pytest.mark.parametrize(
    ("payload", "phrase"),
    [
        (b"", "empty"),
        (b"not an image at all", "not an image"),
        (bad_inputs.zero_size_png(), "0x0"),
        (bad_inputs.encode(Image.new("L", (50, 50), 255)), "no visible strokes"),
        (bad_inputs.encode(Image.new("LA", (50, 50), (0, 0))), "fully transparent"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image"),
    ],
)
def test_bad_images_get_clear_errors(payload, phrase):
    with pytest.raises(ImageError, match=phrase):
        load_glyph(payload, LIMITS)


def test_truncated_image_is_refused():
    png = bad_inputs.scan_png(CHAR, side=200)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_glyph(png[: len(png) // 2], LIMITS)


def test_byte_limit_is_checked_first():
    with pytest.raises(ImageError, match="above the limit of 100 bytes"):
        load_glyph(bad_inputs.scan_png(CHAR), ImageLimits(max_bytes=100, max_pixels=10**6))


def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    bomb = bad_inputs.huge_png()
    assert len(bomb) < 1_000_000  # a small file that would decode to 50 megapixels
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(ImageError, match="50,000,000 pixels"):
        decode_gray(bomb, LIMITS)
    assert not decoded  # refused from the header alone


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_sixteen_bit_scale_is_preserved():
    values = np.full((40, 40), 65535, dtype=np.uint16)
    values[10:30, 18:22] = 0  # a black bar on white, 16-bit
    gray = decode_gray(bad_inputs.encode(Image.fromarray(values)), LIMITS)
    assert gray.max() == pytest.approx(255.0) and gray.min() == pytest.approx(0.0)
    assert Image.open(io.BytesIO(bad_inputs.png16(CHAR))).mode.startswith("I")


@pytest.mark.parametrize("side", [GLYPH_SIDE, 100])
@pytest.mark.parametrize("level", [0, 255])
def test_blank_images_are_refused_at_every_size(side, level):
    blank = bad_inputs.encode(Image.new("L", (side, side), level))
    with pytest.raises(ImageError, match="no visible strokes"):
        load_glyph(blank, LIMITS)


def test_pixel_count_reads_the_header_only():
    from pipeline.imaging import pixel_count

    assert pixel_count(bad_inputs.huge_png(4000, 4000)) == 16_000_000
    assert pixel_count(b"not an image") == 0
