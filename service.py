"""BentoML service: classify handwritten cursive hiragana (Kuzushiji-49 / KMNIST glyphs).

One BentoML service, ``Kuzushiji``, in one process per worker: ``POST /predict`` (one image file,
multipart) and ``POST /predict_batch`` (several files, multipart, or base64 strings in JSON); ``POST
/glyph`` (the 28x28 glyph the model reads, as a PNG); ``GET /version``; the page at ``/`` (static files
in ``page/``) and the OpenAPI page at ``/docs`` (spec: ``/docs.json``); BentoML's ``/livez``, ``/readyz``
and ``/metrics``.

The hot path stays inside the process: the body is read within the limits of ``serve.*`` in params.yaml,
parsed and validated by ``serving.requests`` (pure functions), each image becomes a 28x28 glyph
(``pipeline.imaging``), and ``serving.batcher.MicroBatcher`` merges the glyphs of all concurrent requests
into one ONNX Runtime run. There is no second service and no internal HTTP hop: on a small CPU machine
that hop, not the model, was the limit (benchmarks/SERVE.md measures the alternatives).

The model comes from the BentoML model store (``pipeline.bento.import_champion`` puts the MLflow
champion there): ``serve.bento_model:latest`` or the tag in ``$KUZUSHIJI_BENTO_MODEL``. It is loaded when
the service is instantiated (in each worker), never at import. Every response carries
``X-Model-Version`` (the MLflow registry version) and ``X-Bento-Model`` (the store tag). Every bad
request gets a 4xx JSON ``{"error": {"code", "message", ...}}``; nothing from a request is written to
disk (uploads are parsed in memory, never through temp files).
"""

from __future__ import annotations

import io
import os
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from bentoml.validators import ContentType
from PIL import Image
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.config import load_settings
from pipeline.contract import (
    CLASSMAP_FILE,
    GLYPH_SIDE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    load_classmap,
    onnx_session,
    softmax,
)
from serving.batcher import MicroBatcher
from serving.requests import (
    ParsedRequest,
    RequestLimits,
    RequestRejected,
    body_limit,
    body_too_large,
    check_declared_length,
    decode_glyphs,
    parse_top_k,
    predict_batch_request,
    predict_request,
    top_classes,
)

MODEL_ENV = "KUZUSHIJI_BENTO_MODEL"  # pin a model tag (name:version); default: the store's latest
# BentoML reads the service's options and the model it needs when the class is defined (to configure the
# server, and to pack that model into a bento), so these two come from params.yaml at import; the model
# itself, the class map and the limits are loaded in Kuzushiji.__init__.
_DEFINITION = load_settings().serve
MODEL_TAG = os.environ.get(MODEL_ENV) or f"{_DEFINITION.bento_model}:latest"
VERSION_HEADER, TAG_HEADER = "x-model-version", "x-bento-model"
HOT_ROUTES = {"/predict": False, "/predict_batch": True}  # POST path -> is it predict_batch
# Uploads up to this size are decoded on the event loop (a glyph-sized PNG takes ~0.1 ms: a thread hop
# would cost as much); larger ones in a worker thread, so a big photo does not stall other requests.
INLINE_DECODE_BYTES = 64 * 1024


# ------------------------------------------------------------------------------------------- schemas
# For the OpenAPI page and BentoML clients; responses are built as plain dicts of the same shape.


class ClassScore(BaseModel):
    index: int = Field(description="class index in the model's class map", examples=[0])
    char: str = Field(description="the hiragana character", examples=["あ"])
    codepoint: str = Field(description="its Unicode code point", examples=["U+3042"])
    probability: float = Field(description="softmax probability", ge=0.0, le=1.0, examples=[0.93])


class Prediction(BaseModel):
    model_version: str = Field(description="MLflow registry version of the served model", examples=["3"])
    predictions: list[ClassScore] = Field(description="top-k classes, most probable first")


class ImageResult(BaseModel):
    filename: str | None = Field(description="the uploaded file's name (multipart) or null", examples=["a.png"])
    predictions: list[ClassScore]


class BatchPrediction(BaseModel):
    model_version: str = Field(examples=["3"])
    results: list[ImageResult] = Field(description="one entry per image, in the order sent")


TOP_K_DOC = "number of classes returned per image (1..number of classes; default serve.top_k)"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds ``limit`` bytes; kept in memory only."""
    check_declared_length(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestRejected(400, "client_disconnected", "the client closed the connection mid-upload") from None
    return b"".join(chunks)


async def _receive(request: Request, batch: bool) -> ParsedRequest | RequestRejected:
    """Read and parse one request; a rejection is returned (BentoML would render a raised one its own way)."""
    limits: RequestLimits = bentoml.get_current_service().limits
    content_type = request.headers.get("content-type")
    try:
        body = await _read_body(request, body_limit(content_type, batch, limits))
        return predict_batch_request(body, content_type, limits) if batch else predict_request(body, content_type)
    except RequestRejected as rejected:
        return rejected


class PredictInput(bentoml.IODescriptor):
    """multipart/form-data: ``image`` (the file) and optional ``top_k``; parsed by serving.requests."""

    image: Annotated[Path, ContentType("image/*")] = Field(
        description="one image file (PNG, JPEG, GIF, BMP, TIFF, WebP) of one handwritten character"
    )
    top_k: int | None = Field(None, ge=1, description=TOP_K_DOC, examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictInput:
        # The method receives the whole parsed request (or its rejection) as ``image``.
        return cls.model_construct(image=await _receive(request, batch=False), top_k=None)


class PredictBatchInput(bentoml.IODescriptor):
    """multipart/form-data with repeated ``images`` files, or JSON ``{"images_base64": [...]}``."""

    images: list[Annotated[Path, ContentType("image/*")]] = Field(
        description="1..serve.max_batch_images image files (repeat the form field)"
    )
    top_k: int | None = Field(None, ge=1, description=TOP_K_DOC, examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictBatchInput:
        return cls.model_construct(images=await _receive(request, batch=True), top_k=None)


# ------------------------------------------------------------------------------------------ helpers


def _model_info(stored: Any) -> dict[str, Any]:
    meta = dict(stored.info.metadata)
    return {
        "bento_model": str(stored.tag),
        "registry_model": meta.get("registry_model"),
        "registry_version": str(meta.get("registry_version", stored.tag.version)),
        "dataset": meta.get("dataset"),
        "metrics": meta.get("metrics", {}),
        "num_classes": meta.get("num_classes"),
        "created": stored.info.creation_time.isoformat(),
    }


def _classify(session: Any, glyphs: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) glyphs -> float32 (N, classes) softmax probabilities."""
    images = glyphs.astype(np.float32)[:, None]  # raw 0..255; the model normalises inside
    (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: images})
    return softmax(logits)


def _rejected(rejected: RequestRejected) -> JSONResponse:
    return JSONResponse(rejected.body(), rejected.status)


def _png(glyph: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(glyph, mode="L").save(buffer, "PNG")
    return buffer.getvalue()


class ModelVersionHeaders:
    """ASGI middleware: stamp the served model on every HTTP response (also BentoML's own errors)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers: list[tuple[bytes, bytes]] | None = None  # known once the service is instantiated

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.headers is None:
            info = bentoml.get_current_service().model_info
            self.headers = [
                (VERSION_HEADER.encode(), info["registry_version"].encode()),
                (TAG_HEADER.encode(), info["bento_model"].encode()),
            ]
        headers = self.headers

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, stamped)


class ServeHotRoutes:
    """ASGI middleware: answer ``POST /predict`` and ``/predict_batch`` here, ahead of BentoML's generic
    API dispatch (input-model construction, signature binding, dependency lookups per request: about a
    third of a millisecond of CPU, measured in benchmarks/SERVE.md, on a budget of ~2.5 ms a request).

    The routes stay declared with ``@bentoml.api`` on the service (OpenAPI spec, the /docs page, BentoML
    clients) and give the same answer (``Kuzushiji.answer``); BentoML's outer middlewares (request
    metrics, timeout, concurrency limit) still wrap them. Any other request goes on to BentoML.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        batch = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if batch is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response = await bentoml.get_current_service().answer(await _receive(request, batch), batch)
        await response(scope, receive, send)


# --------------------------------------------------------------------------------- plain web routes


async def _version(_: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().model_info)


# The page people use (plain HTML/CSS/JS, nothing fetched from elsewhere) at /; the OpenAPI page moves to
# /docs: a shell around BentoML's own Swagger UI files (/static_content) and spec (/docs.json).
PAGE_DIR = Path(__file__).resolve().parent / "page"


async def _page(_: Request) -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html")


async def _api_docs(_: Request) -> FileResponse:
    return FileResponse(PAGE_DIR / "docs.html")


WEB_ROUTES = [
    Route("/", _page, methods=["GET"]),
    Route("/docs", _api_docs, methods=["GET"]),
    Route("/version", _version, methods=["GET"]),
    Mount("/page", StaticFiles(directory=PAGE_DIR), name="page"),
]


_IMAGES = bentoml.metrics.Counter(
    name="kuzushiji_images",
    documentation="images received, by endpoint and outcome",
    labelnames=["endpoint", "outcome"],
)
_REQUEST_IMAGES = bentoml.metrics.Histogram(
    name="kuzushiji_request_images",
    documentation="images per accepted request",
    labelnames=["endpoint"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
_ENGINE_BATCH = bentoml.metrics.Histogram(
    name="kuzushiji_engine_batch_images",
    documentation="images per ONNX Runtime run (micro-batching at work)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


# ------------------------------------------------------------------------------------------ service


@bentoml.asgi_app(Starlette(routes=WEB_ROUTES), path="/")
@bentoml.service(
    name="kuzushiji",
    # One worker process per core (in a container: per core of its CPU quota). Each is the whole service:
    # its event loop parses and decodes while its ONNX Runtime session (serve.threads intra-op threads)
    # runs the previous batch, so no core waits on another process. One event loop alone cannot keep 2
    # cores busy (benchmarks/SERVE.md). Override: BENTOML_CONFIG_OPTIONS="services.kuzushiji.workers=N".
    workers="cpu_count",
    traffic={"timeout": _DEFINITION.request_timeout_s},
    metrics={"enabled": True},
    # Per-request costs that do not serve the answer, measured in benchmarks/SERVE.md: an OpenTelemetry
    # span per request (traces are off by default, sample_rate 0, yet the span is still made) and an
    # access-log line per request. Turn them back on with BENTOML_CONFIG_OPTIONS, e.g.
    # "services.kuzushiji.logging.access.enabled=true services.kuzushiji.tracing.excluded_urls=/livez".
    tracing={"excluded_urls": list(HOT_ROUTES)},
    logging={"access": {"enabled": False}},
)
class Kuzushiji:
    """Top-k hiragana classes for uploaded images of handwritten cursive characters."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        serve = load_settings().serve
        try:
            stored = self.model  # BentoML resolves the declared model from the store on first access
        except bentoml.exceptions.NotFound:
            raise RuntimeError(
                f"BentoML model {MODEL_TAG!r} is not in the model store (BENTOML_HOME="
                f"{os.environ.get('BENTOML_HOME', '~/bentoml')}): run the package stage "
                f"(`python -m pipeline.bento import`) or set ${MODEL_ENV} to a stored tag"
            ) from None
        # Fixed for the life of the process: a new model means a new deployment.
        self.model_info = _model_info(stored)
        self.classmap = load_classmap(Path(self.model.path_of(CLASSMAP_FILE)))
        self.limits = RequestLimits(
            max_upload_bytes=serve.max_upload_bytes,
            max_pixels=serve.max_pixels,
            max_batch_images=serve.max_batch_images,
            max_request_bytes=serve.max_request_bytes,
            default_top_k=serve.top_k,
        )
        session = onnx_session(Path(self.model.path_of(ONNX_FILE)), serve.threads)
        engine = partial(_classify, session)
        engine(np.zeros((1, GLYPH_SIDE, GLYPH_SIDE), dtype=np.uint8))  # warm-up: allocate once, now
        self.batcher = MicroBatcher(engine, serve.max_batch_size, on_batch=_ENGINE_BATCH.observe)
        # Large uploads are decoded in threads; at most serve.threads at once, the rest wait.
        self.decoders = anyio.CapacityLimiter(serve.threads)

    @bentoml.api(route="/predict", input_spec=PredictInput)
    async def predict(self, image: Any, top_k: Any = None) -> Prediction:
        """Classify one image file; returns the top-k classes with their probabilities."""
        # Over HTTP, ServeHotRoutes answers before BentoML's dispatch reaches this method (same answer).
        return await self.answer(image, batch=False)  # type: ignore[return-value]  # sent as is

    @bentoml.api(route="/predict_batch", input_spec=PredictBatchInput)
    async def predict_batch(self, images: Any, top_k: Any = None) -> BatchPrediction:
        """Classify several image files in one request (multipart ``images`` or JSON ``images_base64``)."""
        return await self.answer(images, batch=True)  # type: ignore[return-value]

    async def answer(self, parsed: ParsedRequest | RequestRejected, batch: bool) -> Response:
        """The response to a parsed ``predict`` (``batch`` False) or ``predict_batch`` request."""
        endpoint = "predict_batch" if batch else "predict"
        try:
            request = _accepted(parsed)
            k = parse_top_k(request.top_k, len(self.classmap), self.limits.default_top_k)
            probabilities = await self.batcher.run(await self._glyphs(request, batch))
        except RequestRejected as rejected:
            _IMAGES.labels(endpoint=endpoint, outcome="rejected").inc()
            return _rejected(rejected)
        count = len(request.uploads)
        _IMAGES.labels(endpoint=endpoint, outcome="classified").inc(count)
        _REQUEST_IMAGES.labels(endpoint=endpoint).observe(count)
        version = self.model_info["registry_version"]
        if not batch:
            return JSONResponse(
                {"model_version": version, "predictions": top_classes(probabilities[0], k, self.classmap)}
            )
        results = [
            {"filename": upload.filename, "predictions": top_classes(row, k, self.classmap)}
            for upload, row in zip(request.uploads, probabilities, strict=True)
        ]
        return JSONResponse({"model_version": version, "results": results})

    @bentoml.api(route="/glyph", input_spec=PredictInput)
    async def glyph(self, image: Any, top_k: Any = None) -> Annotated[Path, ContentType("image/png")]:
        """The 28x28 glyph the model reads for one image file (pipeline.imaging's preprocessing), as a PNG.

        Read-only: nothing is classified or counted. ``top_k`` is accepted (the form is predict's) and unused.
        """
        try:
            # One image: predict's wording in errors.
            glyphs = await self._glyphs(_accepted(image), batch=False)
        except RequestRejected as rejected:
            return _rejected(rejected)  # type: ignore[return-value]
        return Response(_png(glyphs[0]), media_type="image/png")  # type: ignore[return-value]

    async def _glyphs(self, request: ParsedRequest, batch: bool) -> np.ndarray:
        decode = partial(decode_glyphs, request.uploads, self.limits.image, batch)
        if sum(len(upload.data) for upload in request.uploads) <= INLINE_DECODE_BYTES:
            return decode()
        return await anyio.to_thread.run_sync(decode, limiter=self.decoders)


def _accepted(parsed: ParsedRequest | RequestRejected) -> ParsedRequest:
    if isinstance(parsed, RequestRejected):
        raise parsed
    return parsed


# The first added is the outer one: the model headers go on the hot routes' responses too.
Kuzushiji.add_asgi_middleware(ModelVersionHeaders)  # type: ignore[attr-defined]  # a bentoml.Service at run time
Kuzushiji.add_asgi_middleware(ServeHotRoutes)  # type: ignore[attr-defined]
