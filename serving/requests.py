"""What a ``predict`` / ``predict_batch`` request may hold, as pure functions: bytes and headers in,
validated uploads (or a :class:`RequestRejected`) out, so every rule is unit-tested without a server."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.contract import READINGS, ClassMap
from pipeline.imaging import BlankImageError, ImageError, ImageLimits, load_glyph, pixel_count
from serving.errors import RequestRejected
from serving.limits import JSON, RequestLimits, media_type
from serving.multipart import PartLimits, parse_multipart

MULTIPART = "multipart/form-data"
FORM_FIELD_MAX_BYTES = 1024  # a non-file form field (top_k) is a short number
SINGLE_FIELD, BATCH_FIELD = "image", "images"  # the form field of each endpoint
TOP_K_FIELD = "top_k"
TOP_K_TEXT = re.compile(r"[0-9]{1,6}")  # ASCII digits only, and few: int() of 5,000 digits is slow


@dataclass(frozen=True)
class Upload:
    """One received image file: its bytes and, from multipart, its file name."""

    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class ParsedRequest:
    """The uploads of one request, in the order sent, and ``top_k`` as sent (unvalidated, None if absent)."""

    uploads: tuple[Upload, ...]
    top_k: Any = None


def _part_limits(field: str, batch: bool, limits: RequestLimits) -> PartLimits:
    def too_large(name: str, index: int, limit: int) -> RequestRejected:
        if name == field:
            where = f"image {index}" if batch else "the image"
            return RequestRejected(
                422, "invalid_image", f"{where}: the upload is above the limit of {limit:,} bytes: send a "
                "smaller image (a glyph needs only a few kilobytes)", field=field,
            )
        if name == TOP_K_FIELD:
            return RequestRejected(422, "invalid_top_k", f"top_k is over {limit} bytes", field=name)
        return RequestRejected(400, "unknown_field", f"unexpected form field {name!r}: send the image file(s) "
                               f"as {field!r} and optionally {TOP_K_FIELD!r}")

    images = limits.max_images if batch else 1
    return PartLimits(
        max_parts=images + 2,  # the images, top_k, and one more so that "too many images" can say so
        field_bytes={field: limits.max_upload_bytes, TOP_K_FIELD: FORM_FIELD_MAX_BYTES},
        other_bytes=limits.max_upload_bytes,
        too_large=too_large,
    )


def _from_multipart(body: bytes, content_type: str, batch: bool, limits: RequestLimits) -> ParsedRequest:
    field = BATCH_FIELD if batch else SINGLE_FIELD
    uploads, top_k, unknown = [], [], []
    for part in parse_multipart(body, content_type, _part_limits(field, batch, limits)):
        if part.name == field:
            uploads.append(Upload(part.data, part.filename))
        elif part.name == TOP_K_FIELD and part.filename is None:
            top_k.append(part.data.decode("utf-8", "replace").strip())
        else:
            unknown.append(part.name)
    if unknown:
        raise RequestRejected(
            400,
            "unknown_field",
            f"unexpected form field(s) {sorted(set(unknown))}: send the "
            f"image file(s) as {field!r} and optionally {TOP_K_FIELD!r}",
        )
    if len(top_k) > 1:
        raise RequestRejected(
            422, "invalid_top_k", f"top_k was sent {len(top_k)} times: send it once", field=TOP_K_FIELD
        )
    return ParsedRequest(tuple(uploads), top_k[0] if top_k else None)


def _json_payload(body: bytes, key: str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestRejected(400, "invalid_json", "the JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number of over 4,300 digits
        raise RequestRejected(400, "invalid_json", f"the body is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(payload, dict) or set(payload) - {key, TOP_K_FIELD}:
        raise RequestRejected(
            400,
            "invalid_json",
            f'expected a JSON object {{"{key}": [...], "top_k": 5}} with base64-encoded image files',
        )
    return payload


def _from_json(body: bytes, field: str) -> ParsedRequest:
    key = f"{field}_base64"
    payload = _json_payload(body, key)
    encoded = payload.get(key)
    if isinstance(encoded, str):
        encoded = [encoded]
    if not isinstance(encoded, list) or not all(isinstance(item, str) for item in encoded):
        raise RequestRejected(422, "missing_field", f"{key!r} must be a list of base64 strings", field=key)
    uploads = []
    for index, text in enumerate(encoded):
        try:
            uploads.append(Upload(base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestRejected(
                422,
                "invalid_base64",
                f"{key}[{index}] is not valid base64: encode the raw "
                "file bytes (e.g. base64.b64encode(open(path, 'rb').read()).decode())",
                field=key,
                index=index,
            ) from None
    return ParsedRequest(tuple(uploads), payload.get(TOP_K_FIELD))


def parse_body(body: bytes, content_type: str | None, batch: bool, limits: RequestLimits) -> ParsedRequest:
    """Uploads and raw ``top_k`` from a multipart body (files) or a JSON body of base64 strings
    (``{"image_base64": ...}`` / ``{"images_base64": [...]}``)."""
    field = BATCH_FIELD if batch else SINGLE_FIELD
    kind = media_type(content_type)
    if kind == MULTIPART:
        return _from_multipart(body, content_type or "", batch, limits)
    if kind == JSON:
        return _from_json(body, field)
    raise RequestRejected(
        415,
        "unsupported_media_type",
        f"Content-Type {kind[:80] or '(none)'!r} is not accepted: "
        f"send multipart/form-data with the file(s) in {field!r}"
        + (" or application/json with base64 strings" if batch else ""),
    )


def predict_request(body: bytes, content_type: str | None, limits: RequestLimits) -> ParsedRequest:
    """A ``predict`` request: exactly one image."""
    parsed = parse_body(body, content_type, batch=False, limits=limits)
    if len(parsed.uploads) != 1:
        raise RequestRejected(
            422,
            "missing_field" if not parsed.uploads else "too_many_images",
            f"send exactly one image file in the form field {SINGLE_FIELD!r} (got "
            f"{len(parsed.uploads)}); use /predict_batch for several",
            field=SINGLE_FIELD,
        )
    return parsed


def predict_batch_request(body: bytes, content_type: str | None, limits: RequestLimits) -> ParsedRequest:
    """A ``predict_batch`` request: 1..max_images images."""
    parsed = parse_body(body, content_type, batch=True, limits=limits)
    if not parsed.uploads:
        raise RequestRejected(
            422,
            "missing_field",
            f"no images: send the files in the form field {BATCH_FIELD!r} "
            f"(repeat it per file) or JSON '{BATCH_FIELD}_base64'",
            field=BATCH_FIELD,
        )
    if len(parsed.uploads) > limits.max_images:
        raise RequestRejected(
            413,
            "too_many_images",
            f"{len(parsed.uploads)} images in one request, above the "
            f"limit of {limits.max_images}: split them over several requests",
            field=BATCH_FIELD,
        )
    return parsed


def parse_top_k(value: Any, num_classes: int, default: int) -> int:
    """``top_k`` as sent (form text, JSON number or None) -> 1..num_classes; absent -> ``default``."""
    if value is None or value == "":
        return min(default, num_classes)
    if isinstance(value, str) and TOP_K_TEXT.fullmatch(value.strip()):
        top_k = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        top_k = value
    else:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else f"{value[:40]!r}..."
        raise RequestRejected(422, "invalid_top_k", f"top_k must be a whole number, got {shown}", field=TOP_K_FIELD)
    if not 1 <= top_k <= num_classes:
        shown = str(top_k) if abs(top_k) < 10**9 else "a number far outside that range"
        raise RequestRejected(
            422,
            "invalid_top_k",
            f"top_k must be between 1 and {num_classes} (the number of classes), got {shown}",
            field=TOP_K_FIELD,
        )
    return top_k


def request_pixels(uploads: Sequence[Upload], limits: RequestLimits) -> int:
    """Decoded pixels of all uploads, from their headers; 413 above ``max_pixels_per_request``."""
    counts = [pixel_count(upload.data) for upload in uploads]
    # An image over the per-image limit is refused by its own header, by name, without decoding.
    total = sum(count for count in counts if count <= limits.max_pixels)
    if total > limits.max_pixels_per_request:
        raise RequestRejected(
            413,
            "too_many_pixels",
            f"the images hold {total:,} pixels together, above the limit of {limits.max_pixels_per_request:,} "
            "for one request: downscale them or split them over several requests",
        )
    return total


def decode_glyphs(uploads: Sequence[Upload], limits: ImageLimits, batch: bool) -> np.ndarray:
    """``uint8 (N, 28, 28)`` glyphs of the uploads; the first bad one is rejected (422), named."""
    glyphs = []
    for index, upload in enumerate(uploads):
        try:
            glyphs.append(load_glyph(upload.data, limits))
        except ImageError as exc:
            where = f"image {index}" if batch else "the image"
            name = f" ({upload.filename})" if upload.filename else ""
            raise RequestRejected(
                422,
                "blank_image" if isinstance(exc, BlankImageError) else "invalid_image",
                f"{where}{name}: {exc}",
                **({"field": BATCH_FIELD, "index": index} if batch else {"field": SINGLE_FIELD}),
            ) from None
    return np.stack(glyphs)


def top_classes(probabilities: np.ndarray, k: int, classmap: ClassMap) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one row, most probable first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {
            "index": int(i),
            "char": classmap.chars[i],
            "codepoint": classmap.codepoints[i],
            "reading": READINGS.get(classmap.chars[i]),
            "probability": float(probabilities[i]),
        }
        for i in order
    ]
