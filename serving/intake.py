"""Reading one request within its limits: the body within its size and idle time, held within the
worker's byte budget until the answer is sent, so no client can hang, starve or bloat a worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from serving.errors import RequestRejected
from serving.limits import ByteBudget, RequestLimits, body_limit, body_too_large, declared_length
from serving.requests import ParsedRequest, predict_batch_request, predict_request

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def read_body(receive: Receive, limit: int, idle_timeout_s: float, declared: int | None) -> bytes:
    """The body, kept in memory only: 413 past ``limit``, 408 when it stops arriving for ``idle_timeout_s``."""
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), idle_timeout_s)
        except TimeoutError:
            said = f" of the {declared:,} its Content-Length announced" if declared is not None else ""
            raise RequestRejected(
                408,
                "body_timeout",
                f"the request body stopped arriving after {size:,} bytes{said} (nothing for {idle_timeout_s:g} s): "
                "send the whole body, with a Content-Length that matches it",
            ) from None
        if message["type"] == "http.disconnect":
            raise RequestRejected(400, "client_disconnected", "the client closed the connection mid-upload")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass(frozen=True)
class Intake:
    """The limits of one request and the budget of the worker it shares with the others."""

    limits: RequestLimits
    budget: ByteBudget
    idle_timeout_s: float

    @asynccontextmanager
    async def admit(self, headers: Mapping[str, str], receive: Receive, batch: bool) -> AsyncIterator[ParsedRequest]:
        """Read and parse one request; its bytes stay reserved in the budget while the caller answers it."""
        content_type = headers.get("content-type")
        limit = body_limit(content_type, batch, self.limits)
        declared = declared_length(headers.get("content-length"), limit)
        async with self.budget.reserve(declared if declared is not None else limit):
            body = await read_body(receive, limit, self.idle_timeout_s, declared)
            parse = predict_batch_request if batch else predict_request
            yield parse(body, content_type, self.limits)
