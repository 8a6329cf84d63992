"""The service's outer edge: every answer in the one error shape, metric labels only from known routes,
and a last resort so that a fault is a logged, counted 500 in JSON, never a hang."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml

from serving.errors import JSON_TYPE, error_json, is_error_shape, message_of

logger = logging.getLogger("kuzushiji.service")
UNKNOWN_ROUTE = "/~unknown"  # every path no route serves: one metrics label, however many are tried
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
ERROR_BODY_MAX_BYTES = 64 * 1024  # someone else's error bodies are read whole to reshape them

FAULTS = bentoml.metrics.Counter(
    name="kuzushiji_faults",
    documentation="requests that raised instead of answering (answered 500), by route",
    labelnames=["route"],
)


@dataclass(frozen=True)
class KnownRoutes:
    """The paths the service answers: exact ones and folders of static files."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    def route_of(self, path: str) -> str:
        """``path`` as served, or UNKNOWN_ROUTE; ``/predict/`` is ``/predict`` (no redirect)."""
        if path in self.exact or path.startswith(self.prefixes):
            return path
        stripped = path.rstrip("/")
        return stripped if stripped in self.exact else UNKNOWN_ROUTE


def _not_found(scope: dict[str, Any], path: str, status: int) -> str:
    if status == 404:
        return f"no endpoint at {path[:200]}: the API is listed at /docs"
    return f"{scope.get('method')} is not allowed on {path[:200]}: the API is listed at /docs"


class _Reply:
    """Wraps ``send``: stamps headers on every response; reshapes error bodies not in the one shape."""

    def __init__(self, send: Any, scope: dict[str, Any], path: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.send, self.scope, self.path, self.headers = send, scope, path, headers
        self.started = False
        self.held: dict[str, Any] | None = None
        self.body = b""
        self.swallow = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            own = message.get("headers", [])
            names = {name.lower() for name, _ in own}  # the answer's own model headers win (a swap between)
            message = {**message, "headers": [*own, *(item for item in self.headers if item[0] not in names)]}
            if message["status"] >= 400:
                self.held = message
                return
        elif message["type"] == "http.response.body" and (self.held is not None or self.swallow):
            if self.held is None:  # the rest of an error body already answered whole
                return
            self.body += message.get("body", b"")
            if message.get("more_body", False) and len(self.body) < ERROR_BODY_MAX_BYTES:
                return
            self.swallow = message.get("more_body", False)
            await self._send_error(self.held)
            return
        await self.send(message)

    async def _send_error(self, start: dict[str, Any]) -> None:
        self.held = None
        status = start["status"]
        body = self.body
        if not is_error_shape(body):
            message = _not_found(self.scope, self.path, status) if status in (404, 405) else message_of(body)
            body = error_json(status, message or f"HTTP {status}")
        kept = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers = [*kept, (b"content-type", JSON_TYPE), (b"content-length", str(len(body)).encode())]
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def fault(self, route: str) -> None:
        FAULTS.labels(route=route).inc()
        logger.exception("request %s %s raised instead of answering", self.scope.get("method"), route)
        if self.held is not None:
            await self._send_error(self.held)
        elif not self.started:
            self.held = {"type": "http.response.start", "status": 500, "headers": self.headers}
            self.body = error_json(500, "the server failed to answer this request; the fault is logged")
            await self._send_error(self.held)


class LastResort:
    """ASGI middleware: a request that raises gets a 500 in the one shape at once, logged with its
    traceback and counted (kuzushiji_faults_total); BentoML's timeout would otherwise wait 30 s for it."""

    def __init__(self, app: Any, headers: Callable[[], list[tuple[bytes, bytes]]] | None = None,
                 routes: KnownRoutes | None = None) -> None:
        self.app, self.headers, self.routes = app, headers, routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = self.routes.route_of(path) if self.routes else path
        if route != path:
            scope = {**scope, "path": route, "raw_path": route.encode()}
        reply = _Reply(send, scope, path, self.headers() if self.headers else [])
        try:
            await self.app(scope, receive, reply)
        except Exception:  # the last resort: whatever it was, answer and log it
            await reply.fault(route)


def model_headers(names: tuple[str, str]) -> Callable[[], list[tuple[bytes, bytes]]]:
    """The served model's headers (``X-Model-Version``, ``X-Bento-Model``) once the service exists; they
    change when a new model is swapped in (``model_info`` is then another dict)."""
    cached: list[Any] = [None, []]  # the model_info they were made from, the headers

    def headers() -> list[tuple[bytes, bytes]]:
        try:
            info = bentoml.get_current_service().model_info
        except bentoml.exceptions.BentoMLException:
            return []  # not instantiated yet (starting up)
        if info is not cached[0]:
            cached[:] = [info, [(names[0].encode(), info["registry_version"].encode()),
                                (names[1].encode(), info["bento_model"].encode())]]
        return cached[1]

    return headers


def use_own_prometheus_dir(name: str) -> None:
    """Give this server a Prometheus multiprocess folder of its own: BentoML's default, one folder under
    $BENTOML_HOME, is wiped by any other server started under the same home."""
    if PROMETHEUS_ENV in os.environ:  # a worker: the server that started it chose the folder
        return
    from bentoml._internal.configuration.containers import BentoMLContainer

    folder = Path(tempfile.gettempdir()) / f"{name}-metrics-{os.getpid()}"
    BentoMLContainer.prometheus_multiproc_dir.set(str(folder))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
