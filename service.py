"""BentoML service: the top-k hiragana classes of uploaded images of handwritten cursive characters.

One service in one process per worker, the hot path kept in-process (no internal HTTP hop, which on a
small CPU machine cost more than the model: benchmarks/SERVE.md); limits and errors live in ``serving/``.
"""

from __future__ import annotations

import io
import os
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import ContentType
from PIL import Image
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.config import load_settings
from pipeline.contract import recorded_bento_tag, softmax
from serving import admin, protocol
from serving.decoding import Decoder
from serving.edge import KnownRoutes, LastResort, model_headers, use_own_prometheus_dir
from serving.errors import RequestRejected
from serving.feedback_desk import FeedbackDesk
from serving.intake import Intake
from serving.limits import ByteBudget, RequestLimits
from serving.model_choice import served_tag
from serving.model_holder import MODEL_HEADERS, ModelHolder, load_model, marker_path, own_marker
from serving.openapi import OpenApiInfo, service_info
from serving.requests import ParsedRequest, parse_top_k, top_classes
from serving.schemas import TOP_K_DOC, BatchPrediction, Prediction
from serving.verdicts import verdicts

MODEL_ENV = "KUZUSHIJI_BENTO_MODEL"  # pin a model tag (name:version)
# BentoML reads the service's options and its model when the class is defined, so these come from
# params.yaml at import; the model itself, the class map and the limits load in Kuzushiji.__init__.
_SETTINGS = load_settings()
_DEFINITION = _SETTINGS.serve
MODEL_TAG, MODEL_SOURCE = served_tag(os.environ.get(MODEL_ENV), recorded_bento_tag(_SETTINGS.path("reports")),
                                     _DEFINITION.bento_model)
HOT_ROUTES = {"/predict": "predict", "/predict_batch": "predict_batch", "/glyph": "glyph"}  # POST path -> API
PAGE_DIR = Path(__file__).resolve().parent / "page"
KNOWN_ROUTES = KnownRoutes(
    exact=frozenset({*HOT_ROUTES, "/", "/docs", "/docs.json", "/schema.json", "/version", "/livez", "/healthz",
                     "/readyz", "/metrics", "/feedback", "/admin/reload"}),
    prefixes=("/page/", "/static_content/"),
)

use_own_prometheus_dir("kuzushiji")
own_marker()
protocol.install(protocol.HttpLimits(
    header_timeout_s=_DEFINITION.header_timeout_s,
    keepalive_timeout_s=_DEFINITION.keepalive_timeout_s,
    max_header_bytes=_DEFINITION.max_header_bytes,
    max_headers=_DEFINITION.max_headers,
    edge=partial(LastResort, headers=model_headers(MODEL_HEADERS), routes=KNOWN_ROUTES),
    headers=model_headers(MODEL_HEADERS),
))


async def _receive(request: Request, batch: bool) -> ParsedRequest | RequestRejected:
    """One parsed request, or its rejection (BentoML would render a raised one its own way)."""
    try:
        async with bentoml.get_current_service().intake.admit(request.headers, request.receive, batch) as parsed:
            return parsed
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
        description="1..serve.max_images_per_request image files (repeat the form field)"
    )
    top_k: int | None = Field(None, ge=1, description=TOP_K_DOC, examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictBatchInput:
        return cls.model_construct(images=await _receive(request, batch=True), top_k=None)


def _champion() -> str:
    """The tag to serve now, chosen as at start (a reload or a store poll asks again)."""
    return served_tag(os.environ.get(MODEL_ENV), recorded_bento_tag(_SETTINGS.path("reports")),
                      _DEFINITION.bento_model)[0]


def _png(glyph: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(glyph, mode="L").save(buffer, "PNG")
    return buffer.getvalue()


class ServeHotRoutes:
    """ASGI middleware: answer the POST APIs here, ahead of BentoML's generic dispatch (a third of a
    millisecond a request: benchmarks/SERVE.md); same answers, the routes stay declared for OpenAPI."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        api = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if api is None:
            await self.app(scope, receive, send)
            return
        response = await bentoml.get_current_service().handle(Request(scope, receive), api)
        await response(scope, receive, send)


async def _version(_: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().model_info)


async def _feedback(request: Request) -> Response:
    """POST /feedback: multipart ``image`` and ``label`` (its character or index), optional ``predicted``
    and ``model_version``; 201 ``{"id": ...}`` (200 for the same image and label again). GET: the classes."""
    service = bentoml.get_current_service()
    if request.method == "GET":
        return service.feedback.classes(service.classmap)
    async with service.holder.serving() as served:  # the model that reads the glyph is the one recorded
        return await service.feedback.answer(request, served.classmap, served.batcher.run,
                                             served.info["registry_version"])


async def _reload(request: Request) -> Response:
    service = bentoml.get_current_service()
    return await admin.reload(request.headers.get("authorization"), service.admin_token, service.holder)


async def _page(_: Request) -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html")


async def _api_docs(_: Request) -> FileResponse:
    return FileResponse(PAGE_DIR / "docs.html")


# The page people use at /; the OpenAPI page at /docs, a shell around BentoML's Swagger UI and spec.
WEB_ROUTES = [
    Route("/", _page, methods=["GET"]),
    Route("/docs", _api_docs, methods=["GET"]),
    Route("/version", _version, methods=["GET"]),
    Route("/feedback", _feedback, methods=["GET", "POST"]),
    Route("/admin/reload", _reload, methods=["POST"]),
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


@bentoml.asgi_app(Starlette(routes=WEB_ROUTES), path="/")
@bentoml.service(
    name="kuzushiji",
    # One worker per core (a container's CPU quota), each the whole service: one event loop cannot keep
    # 2 cores busy. Override: BENTOML_CONFIG_OPTIONS="services.kuzushiji.workers=N".
    workers="cpu_count",
    traffic={"timeout": _DEFINITION.request_timeout_s},
    metrics={"enabled": True},
    # No span and no access-log line per hot request (their cost: benchmarks/SERVE.md); both come back
    # with BENTOML_CONFIG_OPTIONS, e.g. "services.kuzushiji.logging.access.enabled=true".
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
                f"(`python -m pipeline.stages.package import`) or set ${MODEL_ENV} to a stored tag"
            ) from None
        self.limits = RequestLimits.from_settings(serve)
        self.intake = Intake(
            self.limits, ByteBudget(serve.worker_body_budget_bytes, serve.queue_timeout_s), serve.body_idle_timeout_s
        )
        self.decoder = Decoder(self.limits, serve.threads)
        # A new champion is swapped in while serving (serving/model_holder.py): the tag may change.
        load = partial(load_model, source=MODEL_SOURCE, threads=serve.threads, max_batch=serve.engine_max_batch,
                       on_batch=_ENGINE_BATCH.observe)
        self.holder = ModelHolder(load(str(stored.tag)), load, _champion, marker_path(), serve.reload_follow_s,
                                  serve.reload_poll_s)
        self.admin_token = admin.admin_token()
        settings = load_settings()
        self.feedback = FeedbackDesk(settings.feedback, settings.root, self.intake, self.decoder)

    @bentoml.on_startup
    async def follow_new_models(self) -> None:
        """Catch up with a reload made before this worker started, then follow the others."""
        await self.holder.follow()
        self.holder.start()

    @property
    def model_info(self) -> dict[str, Any]:
        return self.holder.current.info

    @property
    def classmap(self) -> Any:
        return self.holder.current.classmap

    @bentoml.api(route="/predict", input_spec=PredictInput)
    async def predict(self, image: Any, top_k: Any = None) -> Prediction:
        """Classify one image file; returns the top-k classes with their probabilities."""
        return await self.answer(image, batch=False)  # type: ignore[return-value]  # sent as is

    @bentoml.api(route="/predict_batch", input_spec=PredictBatchInput)
    async def predict_batch(self, images: Any, top_k: Any = None) -> BatchPrediction:
        """Classify several image files in one request (multipart ``images`` or JSON ``images_base64``)."""
        return await self.answer(images, batch=True)  # type: ignore[return-value]

    @bentoml.api(route="/glyph", input_spec=PredictInput)
    async def glyph(self, image: Any, top_k: Any = None) -> Annotated[Path, ContentType("image/png")]:
        """The 28x28 glyph the model reads for one image file, as a PNG (``top_k`` is accepted, unused)."""
        return await self.glyph_png(image)  # type: ignore[return-value]

    async def handle(self, request: Request, api: str) -> Response:
        """The answer to one POST of a hot route, its bytes held in the worker's budget until then."""
        batch = api == "predict_batch"
        try:
            async with self.intake.admit(request.headers, request.receive, batch) as parsed:
                return await (self.glyph_png(parsed) if api == "glyph" else self.answer(parsed, batch))
        except RequestRejected as rejected:
            if api != "glyph":
                _IMAGES.labels(endpoint=api, outcome="rejected").inc()
            return rejected.response()

    async def answer(self, parsed: ParsedRequest | RequestRejected, batch: bool) -> Response:
        """The response to a parsed ``predict`` (``batch`` False) or ``predict_batch`` request."""
        endpoint = "predict_batch" if batch else "predict"
        try:
            request = _accepted(parsed)
            k = parse_top_k(request.top_k, len(self.classmap), self.limits.default_top_k)
            glyphs = await self.decoder.glyphs(request.uploads, batch)
            async with self.holder.serving() as served:  # the model that answers, whatever swaps meanwhile
                logits = await served.batcher.run(glyphs)  # calibrated: the temperature is in the graph
        except RequestRejected as rejected:
            _IMAGES.labels(endpoint=endpoint, outcome="rejected").inc()
            return rejected.response()
        count = len(request.uploads)
        _IMAGES.labels(endpoint=endpoint, outcome="classified").inc(count)
        _REQUEST_IMAGES.labels(endpoint=endpoint).observe(count)
        version, probabilities = served.version, softmax(logits)
        judged = verdicts(served.trust, logits)
        if not batch:
            return JSONResponse({"model_version": version, **judged[0],
                                 "predictions": top_classes(probabilities[0], k, served.classmap)},
                                headers=served.headers)
        results = [
            {"filename": upload.filename, **verdict, "predictions": top_classes(row, k, served.classmap)}
            for upload, row, verdict in zip(request.uploads, probabilities, judged, strict=True)
        ]
        return JSONResponse({"model_version": version, "results": results}, headers=served.headers)

    async def glyph_png(self, parsed: ParsedRequest | RequestRejected) -> Response:
        """What the model reads for one image (read-only: nothing classified or counted)."""
        try:
            glyphs = await self.decoder.glyphs(_accepted(parsed).uploads, batch=False)
        except RequestRejected as rejected:
            return rejected.response()
        return Response(_png(glyphs[0]), media_type="image/png")


def _accepted(parsed: ParsedRequest | RequestRejected) -> ParsedRequest:
    if isinstance(parsed, RequestRejected):
        raise parsed
    return parsed


# The first added is the outer one: a fault anywhere inside is answered before BentoML's timeout waits on it.
Kuzushiji.add_asgi_middleware(LastResort)  # type: ignore[attr-defined]  # a bentoml.Service at run time
Kuzushiji.add_asgi_middleware(  # type: ignore[attr-defined]
    OpenApiInfo, info=lambda: service_info(bentoml.get_current_service().model_info))
Kuzushiji.add_asgi_middleware(ServeHotRoutes)  # type: ignore[attr-defined]
