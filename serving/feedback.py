"""``POST /feedback``: a person's correction, parsed and limited like ``/predict`` (same file rules and body
limits), the label checked against the served class map, writes rate limited per client; pure parsing here,
the store in ``pipeline.feedback_store`` (shared with the collect stage)."""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.contract import ClassMap
from serving.errors import RequestRejected
from serving.limits import RequestLimits, media_type
from serving.multipart import PartLimits, parse_multipart
from serving.requests import FORM_FIELD_MAX_BYTES, MULTIPART, SINGLE_FIELD, Upload

LABEL_FIELD, PREDICTED_FIELD, VERSION_FIELD = "label", "predicted", "model_version"
TEXT_FIELDS = (LABEL_FIELD, PREDICTED_FIELD, VERSION_FIELD)
INDEX_TEXT = re.compile(r"[0-9]{1,4}")
VERSION_TEXT = re.compile(r"[\w.:+-]{1,64}")
MAX_TRACKED_CLIENTS = 10_000  # the rate limiter forgets the longest-idle client beyond this many


@dataclass(frozen=True)
class FeedbackRequest:
    """One correction as sent: the upload, the right class, and what the client says it was shown."""

    upload: Upload
    label: int
    predicted: int | None
    model_version: str | None


def _part_limits(limits: RequestLimits) -> PartLimits:
    def too_large(name: str, _index: int, limit: int) -> RequestRejected:
        if name == SINGLE_FIELD:
            return RequestRejected(422, "invalid_image", f"the image is above the limit of {limit:,} bytes: send a "
                                   "smaller image (a glyph needs only a few kilobytes)", field=name)
        if name in TEXT_FIELDS:
            return RequestRejected(422, f"invalid_{name}", f"{name} is over {limit} bytes", field=name)
        return _unknown_field([name])

    return PartLimits(max_parts=len(TEXT_FIELDS) + 2, other_bytes=FORM_FIELD_MAX_BYTES, too_large=too_large,
                      field_bytes={SINGLE_FIELD: limits.max_upload_bytes,
                                   **dict.fromkeys(TEXT_FIELDS, FORM_FIELD_MAX_BYTES)})


def _unknown_field(names: list[str]) -> RequestRejected:
    return RequestRejected(400, "unknown_field", f"unexpected form field(s) {sorted(set(names))}: send the image "
                           f"file as {SINGLE_FIELD!r}, the right class as {LABEL_FIELD!r}, and optionally "
                           f"{PREDICTED_FIELD!r} and {VERSION_FIELD!r}")


def class_list(classmap: ClassMap, detail: bool = False) -> list[dict[str, Any]]:
    """The classes a label may name; ``detail`` adds the code point and, where the class map has them,
    the readings (romaji), for a person picking the right class from a grid."""
    if not detail:
        return [{"index": i, "char": char} for i, char in enumerate(classmap.chars)]
    readings = getattr(classmap, "readings", None) or ()
    return [{"index": i, "char": char, "codepoint": classmap.codepoints[i],
             **({"reading": readings[i]} if i < len(readings) else {})} for i, char in enumerate(classmap.chars)]


def resolve_class(text: str, classmap: ClassMap, field: str) -> int:
    """A class as its character (``お``), its code point (``U+304A``) or its index; else 422 naming them all."""
    value = text.strip()
    if INDEX_TEXT.fullmatch(value) and int(value) < len(classmap):
        return int(value)
    if value in classmap.chars:
        return classmap.chars.index(value)
    if value.upper() in classmap.codepoints:
        return classmap.codepoints.index(value.upper())
    shown = value if len(value) <= 20 else f"{value[:20]}..."
    chars = " ".join(classmap.chars)
    raise RequestRejected(
        422, f"invalid_{field}", f"{field} {shown!r} is not a class of the served model: send one of its "
        f"{len(classmap)} classes as the character or its index 0..{len(classmap) - 1} ({chars})",
        field=field, labels=class_list(classmap))


def feedback_request(body: bytes, content_type: str | None, limits: RequestLimits,
                     classmap: ClassMap) -> FeedbackRequest:
    """The parts of one ``/feedback`` body: exactly one image, one label, optional predicted/model_version."""
    kind = media_type(content_type)
    if kind != MULTIPART:
        raise RequestRejected(
            415, "unsupported_media_type",
            f"Content-Type {kind[:80] or '(none)'!r} is not accepted: send multipart/form-data with the file in "
            f"{SINGLE_FIELD!r} and the right class in {LABEL_FIELD!r} (curl -F image=@glyph.png -F label=お)")
    images: list[Upload] = []
    texts: dict[str, list[str]] = {name: [] for name in TEXT_FIELDS}
    unknown = []
    for part in parse_multipart(body, content_type or "", _part_limits(limits)):
        if part.name == SINGLE_FIELD:
            images.append(Upload(part.data, part.filename))
        elif part.name in texts and part.filename is None:
            texts[part.name].append(part.data.decode("utf-8", "replace").strip())
        else:
            unknown.append(part.name)
    if unknown:
        raise _unknown_field(unknown)
    if len(images) != 1:
        raise RequestRejected(422, "missing_field" if not images else "too_many_images",
                              f"send exactly one image file in the form field {SINGLE_FIELD!r} (got {len(images)})",
                              field=SINGLE_FIELD)
    for name, values in texts.items():
        if len(values) > 1:
            raise RequestRejected(422, f"invalid_{name}", f"{name} was sent {len(values)} times: send it once",
                                  field=name)
    if not texts[LABEL_FIELD] or not texts[LABEL_FIELD][0]:
        raise RequestRejected(422, "missing_field", f"send the right class in the form field {LABEL_FIELD!r}: its "
                              "character or its index", field=LABEL_FIELD, labels=class_list(classmap))
    label = resolve_class(texts[LABEL_FIELD][0], classmap, LABEL_FIELD)
    predicted = resolve_class(texts[PREDICTED_FIELD][0], classmap, PREDICTED_FIELD) if texts[PREDICTED_FIELD] else None
    version = texts[VERSION_FIELD][0] if texts[VERSION_FIELD] else None
    if version is not None and not VERSION_TEXT.fullmatch(version):
        raise RequestRejected(422, "invalid_model_version", "model_version must be 1..64 letters, digits or "
                              "'.:+-_' (the model_version /predict answered)", field=VERSION_FIELD)
    return FeedbackRequest(images[0], label, predicted, version)


class RateLimiter:
    """Token buckets per client: ``burst`` writes at once, refilled at ``per_minute``; bounded memory."""

    def __init__(self, per_minute: float, burst: int, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.rate, self.burst, self.max_clients = per_minute / 60.0, burst, max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str, now: float | None = None) -> None:
        """Spend one write for ``client``, or 429 saying when the next one is allowed."""
        now = time.monotonic() if now is None else now
        tokens, at = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise RequestRejected(429, "rate_limited", f"too many corrections from this address (at most "
                                  f"{self.burst} at once, then {self.rate * 60:g} a minute): retry in {wait} s",
                                  retry_after_s=wait)
        self.buckets[client] = (tokens - 1.0, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)


def client_address(scope: Mapping[str, Any]) -> str:
    """The peer's address (not X-Forwarded-For, which a client can set to anything)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def store_down(reason: str) -> RequestRejected:
    return RequestRejected(503, "feedback_store_unavailable", f"the correction was not saved: {reason}. Retry "
                           "later; /predict is not affected")
