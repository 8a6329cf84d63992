"""What a ``predict`` / ``predict_batch`` request may hold, as pure functions: bytes and headers in,
validated uploads (or a :class:`RequestRejected`) out.

Nothing here touches the network, the model or params.yaml: limits come in as a :class:`RequestLimits`,
so every rule can be unit-tested without a server (tests/test_requests.py). service.py reads the body,
calls these functions and renders a rejection as ``{"error": {"code", "message", ...}}``.

Errors use BentoML's documented mechanism, a :class:`bentoml.exceptions.BentoMLException` subclass whose
``error_code`` is the HTTP status, so one that escaped our own rendering would still get its 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
from bentoml.exceptions import BentoMLException
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.contract import ClassMap
from pipeline.imaging import ImageError, ImageLimits, load_glyph

MULTIPART = "multipart/form-data"
JSON = "application/json"
# Room for multipart boundaries, part headers and small form fields on top of the image bytes.
MULTIPART_SLACK_BYTES = 64 * 1024
BASE64_GROWTH = 4 / 3  # base64 text is 4/3 of the bytes it encodes
FORM_FIELD_MAX_BYTES = 1024  # a non-file form field (top_k) is a short number
SINGLE_FIELD, BATCH_FIELD = "image", "images"  # the form field of each endpoint
TOP_K_FIELD = "top_k"


class RequestRejected(BentoMLException):
    """A bad request: a 4xx (or 503) whose ``code`` and ``message`` say what is wrong and what to do."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message, error_code=HTTPStatus(status))
        self.status, self.code, self.extra = status, code, extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


@dataclass(frozen=True)
class RequestLimits:
    """The ``serve.*`` limits that bound one request (params.yaml)."""

    max_upload_bytes: int
    max_pixels: int
    max_batch_images: int
    max_request_bytes: int
    default_top_k: int

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)


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


@dataclass(frozen=True)
class MultipartPart:
    name: str
    filename: str | None
    data: bytes


def media_type(content_type: str | None) -> str:
    """``multipart/form-data; boundary=x`` -> ``multipart/form-data`` (lower case, '' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def body_limit(content_type: str | None, batch: bool, limits: RequestLimits) -> int:
    """Most bytes a body may have: the images it may carry plus framing, within max_request_bytes."""
    files = limits.max_batch_images if batch else 1
    image_bytes = files * limits.max_upload_bytes
    if media_type(content_type) == JSON:
        image_bytes = int(image_bytes * BASE64_GROWTH)
    return min(image_bytes + MULTIPART_SLACK_BYTES, limits.max_request_bytes)


def check_declared_length(content_length: str | None, limit: int) -> None:
    """Refuse (413) a body whose Content-Length already says it is too large, before reading it."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise RequestRejected(
            413,
            "too_large",
            f"the request body is {int(content_length):,} bytes, above the "
            f"limit of {limit:,} bytes for this endpoint: send fewer or smaller images",
        )


def body_too_large(limit: int) -> RequestRejected:
    """The rejection for a body that grew past ``limit`` while it was read (no or a false Content-Length)."""
    return RequestRejected(
        413,
        "too_large",
        f"the request body exceeds {limit:,} bytes, the limit for this "
        "endpoint: send fewer or smaller images",
    )


def parse_multipart(body: bytes, content_type: str) -> list[MultipartPart]:
    """Every part of a multipart/form-data body, parsed in memory (never through temporary files)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestRejected(
            400,
            "bad_multipart",
            "multipart/form-data without a boundary parameter: let your "
            "HTTP client build the multipart body (e.g. curl -F image=@glyph.png)",
        )
    parts: list[MultipartPart] = []
    headers: dict[str, bytes] = {}
    field, value = bytearray(), bytearray()
    chunks: list[bytes] = []

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers[field.decode("latin-1").lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get("content-disposition", b""))
        filename = disposition.get(b"filename")
        parts.append(
            MultipartPart(
                name=disposition.get(b"name", b"").decode("utf-8", "replace"),
                filename=filename.decode("utf-8", "replace") if filename is not None else None,
                data=b"".join(chunks),
            )
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestRejected(
            400,
            "bad_multipart",
            f"the multipart body is malformed ({exc}): let your HTTP "
            "client build it (e.g. curl -F image=@glyph.png)",
        ) from None
    return parts


def _from_multipart(body: bytes, content_type: str, field: str) -> ParsedRequest:
    uploads, top_k, unknown = [], None, []
    for part in parse_multipart(body, content_type):
        if part.name == field:
            uploads.append(Upload(part.data, part.filename))
        elif part.name == TOP_K_FIELD and part.filename is None and len(part.data) <= FORM_FIELD_MAX_BYTES:
            top_k = part.data.decode("utf-8", "replace").strip()
        else:
            unknown.append(part.name)
    if unknown:
        raise RequestRejected(
            400,
            "unknown_field",
            f"unexpected form field(s) {sorted(set(unknown))}: send the "
            f"image file(s) as {field!r} and optionally {TOP_K_FIELD!r}",
        )
    return ParsedRequest(tuple(uploads), top_k)


def _from_json(body: bytes, field: str) -> ParsedRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestRejected(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    key = f"{field}_base64"
    if not isinstance(payload, dict) or set(payload) - {key, TOP_K_FIELD}:
        raise RequestRejected(
            400,
            "invalid_json",
            f'expected a JSON object {{"{key}": [...], "top_k": 5}} with base64-encoded image files',
        )
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


def parse_body(body: bytes, content_type: str | None, batch: bool) -> ParsedRequest:
    """Uploads and raw ``top_k`` from a multipart body (files) or, for ``predict_batch`` and ``predict``,
    a JSON body of base64 strings (``{"image_base64": ...}`` / ``{"images_base64": [...]}``)."""
    field = BATCH_FIELD if batch else SINGLE_FIELD
    kind = media_type(content_type)
    if kind == MULTIPART:
        return _from_multipart(body, content_type or "", field)
    if kind == JSON:
        return _from_json(body, field)
    raise RequestRejected(
        415,
        "unsupported_media_type",
        f"Content-Type {kind or '(none)'!r} is not accepted: "
        f"send multipart/form-data with the file(s) in {field!r}"
        + (" or application/json with base64 strings" if batch else ""),
    )


def predict_request(body: bytes, content_type: str | None) -> ParsedRequest:
    """A ``predict`` request: exactly one image."""
    parsed = parse_body(body, content_type, batch=False)
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
    """A ``predict_batch`` request: 1..max_batch_images images."""
    parsed = parse_body(body, content_type, batch=True)
    if not parsed.uploads:
        raise RequestRejected(
            422,
            "missing_field",
            f"no images: send the files in the form field {BATCH_FIELD!r} "
            f"(repeat it per file) or JSON '{BATCH_FIELD}_base64'",
            field=BATCH_FIELD,
        )
    if len(parsed.uploads) > limits.max_batch_images:
        raise RequestRejected(
            413,
            "too_many_images",
            f"{len(parsed.uploads)} images in one request, above the "
            f"limit of {limits.max_batch_images}: split them over several requests",
            field=BATCH_FIELD,
        )
    return parsed


def parse_top_k(value: Any, num_classes: int, default: int) -> int:
    """``top_k`` as sent (form text, JSON number or None) -> 1..num_classes; absent -> ``default``."""
    if value is None or value == "":
        return min(default, num_classes)
    try:
        top_k = int(value)
        if isinstance(value, float | bool) or str(top_k) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise RequestRejected(
            422, "invalid_top_k", f"top_k must be a whole number, got {value!r}", field=TOP_K_FIELD
        ) from None
    if not 1 <= top_k <= num_classes:
        raise RequestRejected(
            422,
            "invalid_top_k",
            f"top_k must be between 1 and {num_classes} (the number of classes), got {top_k}",
            field=TOP_K_FIELD,
        )
    return top_k


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
                "invalid_image",
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
            "probability": float(probabilities[i]),
        }
        for i in order
    ]
