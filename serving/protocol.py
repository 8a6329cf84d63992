"""The HTTP layer's own limits, which BentoML does not expose: a header read timeout, header size and
count limits, the idle keep-alive timeout, and its 400s in the one error shape. uvicorn (inside
``bentoml serve``) uses this protocol once :func:`install` has run in the worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.errors import error_json


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float
    keepalive_timeout_s: int
    max_header_bytes: int
    max_headers: int
    edge: Callable[[Any], Any] | None = None  # wraps the ASGI app (serving.edge.LastResort)
    headers: Callable[[], list[tuple[bytes, bytes]]] | None = None  # stamped on the layer's own answers


_LIMITS: HttpLimits | None = None
_EDGES: dict[int, Any] = {}  # the wrapped app per uvicorn app, made once


def install(limits: HttpLimits) -> None:
    """Make uvicorn's default HTTP protocol this one (a process-wide setting: call it in the server)."""
    global _LIMITS  # uvicorn builds the protocol from a name, not an instance
    _LIMITS = limits
    for name in ("auto", "httptools"):
        uvicorn.config.HTTP_PROTOCOLS[name] = f"{__name__}:GuardedHttpToolsProtocol"


class _Refused(Exception):
    """Raised in a parser callback to stop a request that broke a limit (httptools re-raises it as a
    parser error, which lands in :meth:`send_400_response`)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`HttpLimits`."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = _LIMITS or HttpLimits(10.0, config.timeout_keep_alive, 65536, 100)
        self.timeout_keep_alive = self.limits.keepalive_timeout_s
        if self.limits.edge is not None:
            key = id(config.loaded_app)
            if key not in _EDGES:
                _EDGES[key] = self.limits.edge(config.loaded_app)
            self.app = _EDGES[key]
        self.header_timer: asyncio.TimerHandle | None = None
        self.reading_headers = True
        self.header_bytes = self.header_count = self.header_size = 0
        self.refusal: tuple[int, str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.reading_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if self.reading_headers and self.header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", f"the request line and headers exceed "
                         f"{self.limits.max_header_bytes:,} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_url(self, url: bytes) -> None:
        self.header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.header_size += len(name) + len(value) + 4  # ": " and CRLF
        if self.header_count > self.limits.max_headers:
            self.refusal = (431, "headers_too_large", f"more than {self.limits.max_headers} header fields")
            raise _Refused
        if self.header_size > self.limits.max_header_bytes:
            self.refusal = (431, "headers_too_large", f"the request line and headers exceed "
                            f"{self.limits.max_header_bytes:,} bytes")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.reading_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_headers, self.header_bytes, self.header_count, self.header_size = True, 0, 0, 0

    def send_400_response(self, msg: str) -> None:
        status, code, message = self.refusal or (400, "bad_request", f"{msg} (not a valid HTTP/1.1 request)")
        self._refuse(status, code, message)

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.reading_headers and (self.cycle is None or self.cycle.response_complete):
            self._refuse(408, "request_timeout", f"the request line and headers did not arrive within "
                         f"{self.limits.header_timeout_s:g} s")

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self.transport.is_closing():
            return
        body = error_json(status, message, code)
        extra = self.limits.headers() if self.limits.headers else []
        head = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
        self.transport.write(
            STATUS_LINE[status] + head + b"content-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        self.transport.close()

