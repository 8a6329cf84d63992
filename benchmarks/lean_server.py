"""The lean anchor of the serving benchmark: the least a Python server can do for ``predict``.

One process, one Starlette route, no framework middleware: read the body, parse and validate it with
``serving.requests``, decode the glyph with ``pipeline.imaging``, batch concurrent requests with
``serving.batcher.MicroBatcher`` into ONNX Runtime, answer the same JSON. The service (service.py) does
the same work inside BentoML, so the ratio of the two is what BentoML costs.

Run: ``KUZUSHIJI_LEAN_MODEL_DIR=DIR uvicorn benchmarks.lean_server:app --host 127.0.0.1 --port 8000``
(DIR holds model.onnx and classmap.csv; ``KUZUSHIJI_LEAN_THREADS`` = ONNX Runtime threads, default 1;
``KUZUSHIJI_LEAN_MAX_BATCH`` = largest batch, default 64).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.contract import (
    CLASSMAP_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    load_classmap,
    onnx_session,
    softmax,
)
from serving.batcher import MicroBatcher
from serving.errors import RequestRejected
from serving.limits import RequestLimits
from serving.requests import decode_glyphs, parse_top_k, predict_request, top_classes

MODEL_DIR_ENV, THREADS_ENV, MAX_BATCH_ENV = (
    "KUZUSHIJI_LEAN_MODEL_DIR",
    "KUZUSHIJI_LEAN_THREADS",
    "KUZUSHIJI_LEAN_MAX_BATCH",
)
# The service's defaults (params.yaml serve.*), so both servers accept and refuse the same requests.
LIMITS = RequestLimits(
    max_upload_bytes=5_000_000,
    max_pixels=16_000_000,
    max_pixels_per_request=64_000_000,
    max_images=64,
    max_request_bytes=32_000_000,
    default_top_k=5,
)

model_dir = Path(os.environ[MODEL_DIR_ENV])
classmap = load_classmap(model_dir / CLASSMAP_FILE)
session = onnx_session(model_dir / ONNX_FILE, int(os.environ.get(THREADS_ENV, "1")))


def classify(glyphs: np.ndarray) -> np.ndarray:
    (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: glyphs.astype(np.float32)[:, None]})
    return softmax(logits)


batcher = MicroBatcher(classify, int(os.environ.get(MAX_BATCH_ENV, "64")))


async def predict(request: Request) -> JSONResponse:
    try:
        parsed = predict_request(await request.body(), request.headers.get("content-type"), LIMITS)
        k = parse_top_k(parsed.top_k, len(classmap), LIMITS.default_top_k)
        glyphs = decode_glyphs(parsed.uploads, LIMITS.image, batch=False)
        probabilities = await batcher.run(glyphs)
    except RequestRejected as rejected:
        return JSONResponse(rejected.body(), rejected.status)
    return JSONResponse({"model_version": "lean", "predictions": top_classes(probabilities[0], k, classmap)})


async def ready(_: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", ready)])
