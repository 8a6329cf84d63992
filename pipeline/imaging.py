"""Turn an uploaded image file into a 28x28 glyph the way the dataset was made (docs/ARCHITECTURE.md).

Torch-free so the serving image carries only Pillow and NumPy; every refusal says what to send instead.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.contract import GLYPH_SIDE

# Side of the box the ink's longer side is scaled to inside the 28x28 frame: dataset glyphs are centred
# and fill most of the frame without touching every edge; 24 px is also the middle of the box the
# synthetic renderer draws (pipeline.synthetic, 20..27 px), so served and trained glyphs agree.
GLYPH_BOX = 24
# Pillow decoders we accept. Others (EPS runs Ghostscript, PDF, ICO ...) are not a drawing or a scan
# of one, and some spawn external programs, so they are refused before any decoding.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
BYTE_MAX = 255.0  # 8-bit full scale
UINT16_MAX = 65535.0  # 16-bit full scale (16-bit PNG / TIFF)
# Leading bytes of the accepted formats, to tell "a broken PNG" from "not an image at all".
FILE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"),
)
MID_GRAY = BYTE_MAX / 2  # border brighter than this = paper = dark ink on a light background
# A pixel is ink when it is at least this fraction of the way from the background to the brightest
# ink: ignores scanner noise and JPEG ringing around the character when cropping.
INK_FRACTION = 0.2
# Border band (fraction of the shorter side) whose median estimates the background level.
BORDER_FRACTION = 0.05
# Minimum contrast (0..255) between background and ink for an image to hold a drawing at all.
MIN_CONTRAST = 8.0


class ImageError(ValueError):
    """The upload cannot be turned into a glyph; the message says what is wrong and what to send."""


class BlankImageError(ImageError):
    """Nothing is drawn (flat or fully transparent): the page reads it as "not a kana", not as a fault."""


@dataclass(frozen=True)
class ImageLimits:
    """Upload limits (from ``serve.max_upload_bytes`` / ``serve.max_pixels``)."""

    max_bytes: int
    max_pixels: int


def load_glyph(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Decode an image file's bytes within ``limits`` into a ``uint8 (28, 28)`` white-on-black glyph."""
    return to_glyph(decode_gray(data, limits))


def pixel_count(data: bytes) -> int:
    """Width x height from the file's header alone (no decoding); 0 when the header cannot be read.

    Decoding cost follows the pixels, not the compressed bytes: a 12 KB PNG can hold 16 Mpx.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                width, height = image.size
    except Exception:  # any unreadable header: the decoder will name the problem
        return 0
    return max(width, 0) * max(height, 0)


def decode_gray(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Decode the first frame of an image file into a float32 (H, W) grayscale array in 0..255."""
    if not data:
        raise ImageError("the upload is empty (0 bytes): send a PNG, JPEG, GIF, BMP, TIFF or WebP image file")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"the upload is {len(data):,} bytes, above the limit of {limits.max_bytes:,} bytes: "
            "send a smaller image (a glyph needs only a few kilobytes)"
        )
    image = _open(data, limits)
    try:
        # Decode only now, after the header checks; an animation is decoded up to its first frame.
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(
            f"the {image.format} image data is truncated or corrupt ({exc}): re-export or re-upload the file"
        ) from None
    return _to_gray(image)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's bomb warning would only add noise to the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"the image is too large to decode ({exc}); the limit is {limits.max_pixels:,} pixels: "
            "send a smaller image"
        ) from None
    except UnidentifiedImageError:
        head = data[:8]
        claimed = next((fmt for magic, fmt in FILE_SIGNATURES if data.startswith(magic)), None)
        if claimed:
            raise ImageError(
                f"the upload starts like a {claimed} file but its header is invalid (corrupt, or a 0x0 / "
                "empty image): re-export the image"
            ) from None
        raise ImageError(
            f"the upload ({len(data):,} bytes, starting {head!r}) is not an image file this service reads: "
            f"send one of {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image header is corrupt ({exc}): re-export or re-upload the file") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image is {width}x{height} pixels (empty): send an image with a drawn glyph")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{limits.max_pixels:,} pixels: downscale it (a glyph needs only a few hundred pixels a side)"
        )
    return image


def _to_gray(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 grayscale 0..255, transparent areas composited on a contrasting background."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float samples: scale to 0..255 by the range the samples use.
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if mode == "F" and peak <= 1.0:
            scale = BYTE_MAX
        elif peak > BYTE_MAX:
            scale = BYTE_MAX / UINT16_MAX if peak <= UINT16_MAX else BYTE_MAX / peak
        else:
            scale = 1.0
        return np.clip(values * scale, 0.0, BYTE_MAX).astype(np.float32)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if not has_alpha:
        if mode == "CMYK":
            image = image.convert("RGB")
        return np.asarray(image.convert("L"), dtype=np.float32)
    rgba = image.convert("RGBA")
    gray = np.asarray(rgba.convert("L"), dtype=np.float32)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / BYTE_MAX
    if float(alpha.sum()) == 0.0:
        raise BlankImageError("the image is fully transparent: nothing is drawn on it")
    # The background that contrasts with the drawn (opaque) pixels: dark strokes go on white, light
    # strokes on black. Compositing everything on white would erase white strokes, and vice versa.
    ink_level = float((gray * alpha).sum() / alpha.sum())
    background = BYTE_MAX if ink_level < MID_GRAY else 0.0
    return gray * alpha + background * (1.0 - alpha)


def to_glyph(gray: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) 0..255 -> ``uint8 (28, 28)`` white strokes on black, framed like the dataset."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2 or min(gray.shape) == 0:
        raise ImageError(f"expected a non-empty 2-D grayscale image, got shape {gray.shape}")
    if _border_level(gray) > MID_GRAY:
        gray = BYTE_MAX - gray  # dark ink on light paper -> the dataset's white-on-black
    background = _border_level(gray)
    if float(gray.max()) - background < MIN_CONTRAST:  # checked before the 28x28 shortcut: blank at any size
        raise BlankImageError(
            "the image has no visible strokes (it is blank or a single flat colour): "
            "send an image of one handwritten character"
        )
    if gray.shape == (GLYPH_SIDE, GLYPH_SIDE):
        # Already a dataset glyph: its framing is the dataset's own, re-cropping would only resample it.
        return np.clip(np.rint(gray), 0, BYTE_MAX).astype(np.uint8)
    gray = np.clip(gray - background, 0.0, None)  # paper texture / scanner gray -> black
    peak = float(gray.max())
    gray = gray * (BYTE_MAX / peak)  # strongest stroke -> 255, like the dataset's ink
    rows, cols = np.nonzero(gray >= INK_FRACTION * BYTE_MAX)
    crop = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # Pad to a centred square (keeps the aspect ratio), scale it to the glyph box, centre it in the frame.
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    boxed = Image.fromarray(square).resize((GLYPH_BOX, GLYPH_BOX), Image.Resampling.LANCZOS)
    frame = np.zeros((GLYPH_SIDE, GLYPH_SIDE), dtype=np.float32)
    offset = (GLYPH_SIDE - GLYPH_BOX) // 2
    frame[offset : offset + GLYPH_BOX, offset : offset + GLYPH_BOX] = np.asarray(boxed)
    return np.clip(np.rint(frame), 0, BYTE_MAX).astype(np.uint8)


def _border_level(gray: np.ndarray) -> float:
    """Median of a thin band along the four edges: the background (paper) brightness."""
    band = max(1, round(min(gray.shape) * BORDER_FRACTION))
    edges = np.concatenate(
        [gray[:band].ravel(), gray[-band:].ravel(), gray[:, :band].ravel(), gray[:, -band:].ravel()]
    )
    return float(np.median(edges))
