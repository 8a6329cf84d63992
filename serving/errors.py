"""The service's one error shape, ``{"error": {"code", "message", ...}}``, for every 4xx and 5xx it answers.

A rejection is a BentoMLException whose ``error_code`` is the HTTP status, so one that escaped our own
rendering would still get its status from BentoML.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse

JSON_TYPE = b"application/json"
# The code of an error this service did not raise itself (the HTTP layer's, BentoML's, Starlette's).
STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    431: "headers_too_large",
    500: "internal_error",
    503: "overloaded",
    504: "timeout",
}
MESSAGE_MAX_CHARS = 500
UNREAD_BODY_STATUSES = frozenset({400, 408, 413, 503})


class RequestRejected(BentoMLException):
    """A bad request: a 4xx (or 503) whose ``code`` and ``message`` say what is wrong and what to do."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message, error_code=HTTPStatus(status))
        self.status, self.code, self.extra = status, code, extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.status in UNREAD_BODY_STATUSES:  # the body may be left unread: the connection cannot be reused
            headers["connection"] = "close"
        if self.status == HTTPStatus.SERVICE_UNAVAILABLE:
            headers["retry-after"] = "1"
        return JSONResponse(self.body(), self.status, headers=headers)


def error_json(status: int, message: str, code: str | None = None) -> bytes:
    """The encoded error body for ``status``; ``code`` defaults to the status's name."""
    error = {"code": code or STATUS_CODES.get(status, f"http_{status}"), "message": message[:MESSAGE_MAX_CHARS]}
    return json.dumps({"error": error}).encode()


def is_error_shape(body: bytes) -> bool:
    """Whether ``body`` already is ``{"error": {"code": str, "message": str, ...}}``."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)


def message_of(body: bytes) -> str:
    """The human text of someone else's error body: its ``error`` string if JSON, else the text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
        return payload["detail"]
    return text
