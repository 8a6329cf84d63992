"""serving.edge without a server: a fault is a logged, counted 500 in the one shape; other errors are
reshaped; unknown paths share one label (the same middleware runs inside `bentoml serve`, tests/test_service.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from starlette.responses import PlainTextResponse

from serving.edge import FAULTS, UNKNOWN_ROUTE, KnownRoutes, LastResort

ROUTES = KnownRoutes(exact=frozenset({"/predict", "/version"}), prefixes=("/page/",))
HEADERS = [(b"x-model-version", b"7")]


def call(app: Any, path: str = "/predict", method: str = "POST") -> tuple[int, dict[bytes, bytes], bytes, str]:
    sent: list[dict[str, Any]] = []
    seen_path: list[str] = []

    async def inner(scope: dict, receive: Any, send: Any) -> None:
        seen_path.append(scope["path"])
        await app(scope, receive, send)

    received: list[bool] = []

    async def receive() -> dict[str, Any]:
        if received:  # after the body: the client waits for the answer, then goes
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}
        received.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    edge = LastResort(inner, headers=lambda: HEADERS, routes=ROUTES)
    asyncio.run(edge({"type": "http", "path": path, "method": method, "headers": []}, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, seen_path[0]


def test_a_fault_is_a_json_500_logged_and_counted(caplog):
    async def boom(scope: dict, receive: Any, send: Any) -> None:
        raise RuntimeError("engine exploded")

    before = FAULTS.labels(route="/predict")._value.get()  # the prometheus child behind BentoML's proxy
    with caplog.at_level(logging.ERROR, logger="kuzushiji.service"):
        status, headers, body, _ = call(boom)
    assert status == 500 and headers[b"content-type"] == b"application/json"
    assert json.loads(body)["error"]["code"] == "internal_error" and headers[b"x-model-version"] == b"7"
    assert int(headers[b"content-length"]) == len(body)
    assert "engine exploded" in caplog.text  # the traceback is in the log
    assert FAULTS.labels(route="/predict")._value.get() == before + 1


def test_a_fault_after_the_response_started_is_logged_not_answered_twice(caplog):
    async def late(scope: dict, receive: Any, send: Any) -> None:
        await PlainTextResponse("ok")(scope, receive, send)
        raise RuntimeError("after the answer")

    with caplog.at_level(logging.ERROR, logger="kuzushiji.service"):
        status, _, body, _ = call(late)
    assert (status, body) == (200, b"ok") and "after the answer" in caplog.text


@pytest.mark.parametrize(("status", "text", "code"), [(404, "Not Found", "not_found"), (405, "Method Not Allowed",
                         "method_not_allowed"), (504, '{"error": "Not able to process in 30 s"}', "timeout")])
def test_someone_elses_errors_are_reshaped(status, text, code):
    status_got, headers, body, _ = call(PlainTextResponse(text, status_code=status))
    error = json.loads(body)["error"]
    assert status_got == status and error["code"] == code and headers[b"content-type"] == b"application/json"
    if status == 504:
        assert error["message"] == "Not able to process in 30 s"


def test_unknown_paths_share_one_label_and_a_trailing_slash_is_the_route():
    ok = PlainTextResponse("ok")
    assert call(ok, "/random/123")[3] == UNKNOWN_ROUTE
    assert call(ok, "/predict/")[3] == "/predict"
    assert call(ok, "/page/page.js")[3] == "/page/page.js"


def test_a_long_streamed_error_body_is_answered_once_in_the_shape():
    from starlette.responses import StreamingResponse

    async def chunks():
        for _ in range(10):
            yield b"x" * 20_000

    status, headers, body, _ = call(StreamingResponse(chunks(), status_code=500))
    error = json.loads(body)["error"]
    assert status == 500 and error["code"] == "internal_error" and int(headers[b"content-length"]) == len(body)
