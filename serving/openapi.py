"""The OpenAPI page's ``info`` as this service's own (what it does, the model served, its version) instead
of the framework's boilerplate: BentoML fills it from the service name and its own readme template."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

SPEC_PATH = "/docs.json"
TITLE = "Kuzushiji kana reader"


def service_info(model: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``info`` for the model described by ``model`` (the service's ``/version`` answer)."""
    version = f"{model.get('registry_model') or 'unregistered'} v{model.get('registry_version')}"
    accuracy = (model.get("metrics") or {}).get("test_balanced_accuracy")
    scored = f", test balanced accuracy {float(accuracy):.4f}" if accuracy is not None else ""
    return {
        "title": TITLE,
        "version": version,
        "description": (
            "Reads handwritten cursive hiragana (kuzushiji): `POST /predict` takes one image file and answers "
            "the top-k of the model's classes with their probabilities; `POST /predict_batch` takes several. "
            f"Model served: `{model.get('bento_model')}` ({version}, dataset {model.get('dataset')}{scored}). "
            "The page for people: [/](/). The model in full: [/version](/version)."
        ),
    }


class OpenApiInfo:
    """ASGI middleware: rewrites ``info`` of the OpenAPI document BentoML answers at ``/docs.json``."""

    def __init__(self, app: Any, info: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.info = info

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != SPEC_PATH or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            spec = json.loads(body)
            spec["info"] = self.info()
            body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
