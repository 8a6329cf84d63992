"""What one request may hold and what one worker may hold at once, so no request can bloat a worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.imaging import ImageLimits
from serving.errors import RequestRejected

JSON = "application/json"
# Room for multipart boundaries, part headers and small form fields on top of the image bytes.
MULTIPART_SLACK_BYTES = 64 * 1024
BASE64_GROWTH = 4 / 3  # base64 text is 4/3 of the bytes it encodes
# A request holds its body and, once parsed, a copy of its parts: it reserves twice its size.
COPIES_HELD = 2


@dataclass(frozen=True)
class RequestLimits:
    """The ``serve.*`` limits that bound one request (params.yaml)."""

    max_upload_bytes: int
    max_pixels: int
    max_pixels_per_request: int
    max_images: int
    max_request_bytes: int
    default_top_k: int

    @classmethod
    def from_settings(cls, serve: Any) -> RequestLimits:
        return cls(
            max_upload_bytes=serve.max_upload_bytes,
            max_pixels=serve.max_pixels,
            max_pixels_per_request=serve.max_pixels_per_request,
            max_images=serve.max_images_per_request,
            max_request_bytes=serve.max_request_bytes,
            default_top_k=serve.top_k,
        )

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels)


def media_type(content_type: str | None) -> str:
    """``multipart/form-data; boundary=x`` -> ``multipart/form-data`` (lower case, '' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def body_limit(content_type: str | None, batch: bool, limits: RequestLimits) -> int:
    """Most bytes a body may have: the images it may carry plus framing, within max_request_bytes."""
    files = limits.max_images if batch else 1
    image_bytes = files * limits.max_upload_bytes
    if media_type(content_type) == JSON:
        image_bytes = int(image_bytes * BASE64_GROWTH)
    return min(image_bytes + MULTIPART_SLACK_BYTES, limits.max_request_bytes)


def declared_length(content_length: str | None, limit: int) -> int | None:
    """The Content-Length as a number (None when absent); 413 when it already says the body is too large."""
    if content_length is None:
        return None
    text = content_length.strip()
    if not text.isascii() or not text.isdigit():
        raise RequestRejected(400, "bad_request", f"Content-Length {content_length[:40]!r} is not a number of bytes")
    if len(text) > len(str(limit)) or int(text) > limit:
        shown = f"{int(text):,} bytes" if len(text) <= 20 else "more bytes than any limit"
        raise RequestRejected(
            413,
            "too_large",
            f"the request body is {shown}, above the limit of {limit:,} bytes for this endpoint: "
            "send fewer or smaller images",
        )
    return int(text)


def body_too_large(limit: int) -> RequestRejected:
    """The rejection for a body that grew past ``limit`` while it was read (no or a false Content-Length)."""
    return RequestRejected(
        413,
        "too_large",
        f"the request body exceeds {limit:,} bytes, the limit for this endpoint: send fewer or smaller images",
    )


class ByteBudget:
    """Bytes of request bodies one worker holds at once: a burst of large bodies waits for room, then
    gets 503, instead of swelling the worker's memory (measured in benchmarks/SERVE.md)."""

    def __init__(self, capacity: int, timeout_s: float) -> None:
        self.capacity, self.timeout_s = capacity, timeout_s
        self.used = 0
        self._freed: asyncio.Event | None = None  # created on the worker's event loop

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        size = min(size * COPIES_HELD, self.capacity)  # one request alone always fits
        if self.used + size > self.capacity:
            await self._wait_for(size)
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            if self._freed is not None:
                self._freed.set()

    async def _wait_for(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while self.used + size > self.capacity:
            if self._freed is None or self._freed.is_set():
                self._freed = asyncio.Event()
            try:
                await asyncio.wait_for(self._freed.wait(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise RequestRejected(
                    503,
                    "overloaded",
                    f"this worker already holds {self.used:,} bytes of requests (its budget is "
                    f"{self.capacity:,}): retry in a moment, or send smaller images",
                ) from None
