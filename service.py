"""BentoML service: classify handwritten cursive hiragana (Kuzushiji-49 / KMNIST glyphs).

Two BentoML services (the documented pattern for adaptive batching of single requests):

* ``Kuzushiji`` (the HTTP entry point): ``POST /predict`` (one image file, multipart) and
  ``POST /predict_batch`` (several files, multipart, or base64 strings in JSON); ``POST /glyph`` (the
  28x28 glyph the model reads, as a PNG); ``GET /version``; the page at ``/`` (static files in
  ``page/``) and the OpenAPI page at ``/docs`` (spec: ``/docs.json``); BentoML's ``/livez``,
  ``/readyz`` and ``/metrics``. It parses uploads in memory within the limits of
  ``serve.*`` in params.yaml, turns each image into a 28x28 glyph (``pipeline.imaging``) and formats
  the top-k classes.
* ``Engine``: one batchable ONNX Runtime endpoint. Concurrent requests from ``Kuzushiji`` are merged
  by BentoML's adaptive batching (``serve.max_batch_size`` / ``serve.max_latency_ms``).

The model comes from the BentoML model store (``pipeline.bento.import_champion`` puts the MLflow
champion there): ``serve.bento_model:latest`` or the tag in ``$KUZUSHIJI_BENTO_MODEL``. Every response
carries ``X-Model-Version`` (the MLflow registry version) and ``X-Bento-Model`` (the store tag).
Every bad request gets a 4xx JSON ``{"error": {"code", "message", ...}}``; nothing from a request is
written to disk (uploads are parsed in memory, never through temp files).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import bentoml
import numpy as np
import onnxruntime as ort
from bentoml.validators import ContentType
from PIL import Image
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.config import load_settings
from pipeline.imaging import GLYPH_SIDE, ImageError, ImageLimits, load_glyph

SERVE = load_settings().serve
MODEL_ENV = "KUZUSHIJI_BENTO_MODEL"  # pin a model tag (name:version); default: the store's latest
MODEL_TAG = os.environ.get(MODEL_ENV) or f"{SERVE.bento_model}:latest"
LIMITS = ImageLimits(max_bytes=SERVE.max_upload_bytes, max_pixels=SERVE.max_pixels)

# Files inside the BentoML model (written by pipeline.bento); the ONNX graph's IO names (pipeline.export).
ONNX_FILE, CLASSMAP_FILE, META_FILE = "model.onnx", "classmap.csv", "meta.json"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
# Room for multipart boundaries, part headers and small form fields on top of the image bytes.
MULTIPART_SLACK_BYTES = 64 * 1024
BASE64_GROWTH = 4 / 3  # base64 text is 4/3 of the bytes it encodes
FORM_FIELD_MAX_BYTES = 1024  # a non-file form field (top_k) is a short number
VERSION_HEADER, TAG_HEADER = "x-model-version", "x-bento-model"
# BentoML 1.4.40 replaces its client session to a dependency every 100 requests / 300 s and closes the
# old one while concurrent calls still use it ("Server disconnected" -> 500s under load). Keep one session.
ENGINE_CONNECTION = {"max_requests": 2**62, "max_age": 10.0**12}


# --------------------------------------------------------------------------------------------- model


def _stored_model() -> Any:
    try:
        return bentoml.models.get(MODEL_TAG)
    except bentoml.exceptions.NotFound:
        raise RuntimeError(
            f"BentoML model {MODEL_TAG!r} is not in the model store (BENTOML_HOME="
            f"{os.environ.get('BENTOML_HOME', '~/bentoml')}): run the package stage "
            f"(`python -m pipeline.bento import`) or set ${MODEL_ENV} to a stored tag"
        ) from None


def _model_info() -> dict[str, Any]:
    stored = _stored_model()
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


MODEL_INFO = _model_info()  # fixed for the life of the process: a new model means a new deployment


def _read_classmap(path: Path) -> list[tuple[str, str]]:
    """(codepoint, char) per class index from the model's ``index,codepoint,char`` CSV."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["index"]))
    return [(row["codepoint"], row["char"]) for row in rows]


# ------------------------------------------------------------------------------------------- schemas


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


TOP_K_DOC = f"number of classes returned per image (1..number of classes; default {SERVE.top_k})"


class RequestProblem(Exception):
    """A bad request: becomes a 4xx JSON error naming what is wrong and what to do."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message, **self.extra}}, self.status)


class _Upload(BaseModel):
    """One received image: its bytes and, from multipart, its file name."""

    data: bytes
    filename: str | None = None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds ``limit`` bytes; kept in memory only."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestProblem(413, "too_large", f"the request body is {int(declared):,} bytes, above the "
                             f"limit of {limit:,} bytes for this endpoint: send fewer or smaller images")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestProblem(413, "too_large", f"the request body exceeds {limit:,} bytes, the limit "
                                     "for this endpoint: send fewer or smaller images")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestProblem(400, "client_disconnected", "the client closed the connection mid-upload") from None
    return b"".join(chunks)


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, bytes) per part of a multipart/form-data body, parsed in memory."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestProblem(400, "bad_multipart", "multipart/form-data without a boundary parameter: let your "
                             "HTTP client build the multipart body (e.g. curl -F image=@glyph.png)")
    parts: list[tuple[str, str | None, bytes]] = []
    current: dict[str, Any] = {}

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=[], field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current["value"] += data[start:end]

    def on_header_end() -> None:
        current["headers"][current["field"].decode("latin-1").lower()] = current["value"]
        current["field"], current["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(current["headers"].get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        parts.append((name, filename.decode("utf-8", "replace") if filename is not None else None,
                      b"".join(current["data"])))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestProblem(400, "bad_multipart", f"the multipart body is malformed ({exc}): let your HTTP "
                             "client build it (e.g. curl -F image=@glyph.png)") from None
    return parts


def _parse_top_k(value: Any, num_classes: int) -> int:
    if value is None or value == "":
        return min(SERVE.top_k, num_classes)
    try:
        top_k = int(value)
        if isinstance(value, float | bool) or str(top_k) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise RequestProblem(422, "invalid_top_k", f"top_k must be a whole number, got {value!r}",
                             field="top_k") from None
    if not 1 <= top_k <= num_classes:
        raise RequestProblem(422, "invalid_top_k", f"top_k must be between 1 and {num_classes} (the number of "
                             f"classes), got {top_k}", field="top_k")
    return top_k


async def _read_uploads(request: Request, field: str, max_files: int) -> tuple[list[_Upload], Any]:
    """Image uploads of ``field`` and the raw ``top_k`` from multipart (files) or JSON (base64)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        limit = min(max_files * SERVE.max_upload_bytes + MULTIPART_SLACK_BYTES, SERVE.max_request_bytes)
        parts = _parse_multipart(await _read_body(request, limit), request.headers["content-type"])
        uploads, top_k, unknown = [], None, []
        for name, filename, data in parts:
            if name == field:
                uploads.append(_Upload(data=data, filename=filename))
            elif name == "top_k" and filename is None and len(data) <= FORM_FIELD_MAX_BYTES:
                top_k = data.decode("utf-8", "replace").strip()
            else:
                unknown.append(name)
        if unknown:
            raise RequestProblem(400, "unknown_field", f"unexpected form field(s) {sorted(set(unknown))}: send the "
                                 f"image file(s) as {field!r} and optionally 'top_k'")
        return uploads, top_k
    if media_type == "application/json":
        limit = min(int(max_files * SERVE.max_upload_bytes * BASE64_GROWTH) + MULTIPART_SLACK_BYTES,
                    SERVE.max_request_bytes)
        body = await _read_body(request, limit)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestProblem(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
        key = f"{field}_base64"
        if not isinstance(payload, dict) or set(payload) - {key, "top_k"}:
            raise RequestProblem(400, "invalid_json", f'expected a JSON object {{"{key}": [...], "top_k": 5}} '
                                 "with base64-encoded image files")
        encoded = payload.get(key)
        if isinstance(encoded, str):
            encoded = [encoded]
        if not isinstance(encoded, list) or not all(isinstance(item, str) for item in encoded):
            raise RequestProblem(422, "missing_field", f"{key!r} must be a list of base64 strings", field=key)
        uploads = []
        for index, text in enumerate(encoded):
            try:
                uploads.append(_Upload(data=base64.b64decode(text, validate=True)))
            except (binascii.Error, ValueError):
                raise RequestProblem(422, "invalid_base64", f"{key}[{index}] is not valid base64: encode the raw "
                                     "file bytes (e.g. base64.b64encode(open(path, 'rb').read()).decode())",
                                     field=key, index=index) from None
        return uploads, payload.get("top_k")
    raise RequestProblem(415, "unsupported_media_type", f"Content-Type {media_type or '(none)'!r} is not "
                         f"accepted: send multipart/form-data with the file(s) in {field!r}"
                         + (" or application/json with base64 strings" if max_files > 1 else ""))


class PredictInput(bentoml.IODescriptor):
    """multipart/form-data: ``image`` (the file) and optional ``top_k``."""

    image: Annotated[Path, ContentType("image/*")] = Field(
        description="one image file (PNG, JPEG, GIF, BMP, TIFF, WebP) of one handwritten character"
    )
    top_k: int | None = Field(None, ge=1, description=TOP_K_DOC, examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictInput:
        try:
            uploads, top_k = await _read_uploads(request, "image", max_files=1)
            if len(uploads) != 1:
                raise RequestProblem(422, "missing_field" if not uploads else "too_many_images",
                                     f"send exactly one image file in the form field 'image' (got {len(uploads)}); "
                                     "use /predict_batch for several", field="image")
            return cls.model_construct(image=uploads[0], top_k=top_k)
        except RequestProblem as problem:
            return cls.model_construct(image=problem, top_k=None)


class PredictBatchInput(bentoml.IODescriptor):
    """multipart/form-data with repeated ``images`` files, or JSON ``{"images_base64": [...]}``."""

    images: list[Annotated[Path, ContentType("image/*")]] = Field(
        description=f"1..{SERVE.max_batch_images} image files (repeat the form field)"
    )
    top_k: int | None = Field(None, ge=1, description=TOP_K_DOC, examples=[5])

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictBatchInput:
        try:
            uploads, top_k = await _read_uploads(request, "images", max_files=SERVE.max_batch_images)
            if not uploads:
                raise RequestProblem(422, "missing_field", "no images: send the files in the form field 'images' "
                                     "(repeat it per file) or JSON 'images_base64'", field="images")
            if len(uploads) > SERVE.max_batch_images:
                raise RequestProblem(413, "too_many_images", f"{len(uploads)} images in one request, above the "
                                     f"limit of {SERVE.max_batch_images}: split them over several requests",
                                     field="images")
            return cls.model_construct(images=uploads, top_k=top_k)
        except RequestProblem as problem:
            return cls.model_construct(images=problem, top_k=None)


# ------------------------------------------------------------------------------------------ services


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = SERVE.threads
    options.inter_op_num_threads = 1  # one sequential graph: parallelism comes from intra-op threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@bentoml.service(
    name="kuzushiji_engine",
    workers=1,  # one ONNX Runtime session that owns serve.threads cores
    threads=1,  # batches run one at a time; BentoML's dispatcher merges the waiting requests
    traffic={"timeout": SERVE.request_timeout_s},
    runner_connection=ENGINE_CONNECTION,
)
class Engine:
    """ONNX Runtime on CPU behind BentoML's adaptive batching."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.session = _session(Path(self.model.path_of(ONNX_FILE)))
        self.classify(np.zeros((1, GLYPH_SIDE, GLYPH_SIDE), dtype=np.uint8))  # warm-up: allocate once

    @bentoml.api(batchable=True, max_batch_size=SERVE.max_batch_size, max_latency_ms=SERVE.max_latency_ms)
    def classify(self, glyphs: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) glyphs -> float32 (N, classes) softmax probabilities."""
        images = glyphs.astype(np.float32)[:, None]  # raw 0..255; the model normalises inside
        (logits,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: images})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


class ModelVersionHeaders:
    """ASGI middleware: stamp the served model on every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.headers = [
            (VERSION_HEADER.encode(), MODEL_INFO["registry_version"].encode()),
            (TAG_HEADER.encode(), MODEL_INFO["bento_model"].encode()),
        ]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, stamped)


async def _version(_: Request) -> JSONResponse:
    return JSONResponse(MODEL_INFO)


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


def _png(glyph: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(glyph, mode="L").save(buffer, "PNG")
    return buffer.getvalue()


_IMAGES = bentoml.metrics.Counter(
    name="kuzushiji_images", documentation="images received, by endpoint and outcome",
    labelnames=["endpoint", "outcome"],
)
_REQUEST_IMAGES = bentoml.metrics.Histogram(
    name="kuzushiji_request_images", documentation="images per accepted request",
    labelnames=["endpoint"], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


@bentoml.asgi_app(Starlette(routes=WEB_ROUTES), path="/")
@bentoml.service(
    name="kuzushiji",
    workers=1,
    traffic={"timeout": SERVE.request_timeout_s},
    metrics={"enabled": True},
)
class Kuzushiji:
    """Top-k hiragana classes for uploaded images of handwritten cursive characters."""

    engine = bentoml.depends(Engine)
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.classes = _read_classmap(Path(self.model.path_of(CLASSMAP_FILE)))
        # Decoding is CPU work: at most serve.threads images are decoded at once, the rest wait.
        self.decoders = anyio.CapacityLimiter(SERVE.threads)

    @bentoml.api(route="/predict", input_spec=PredictInput)
    async def predict(self, image: Any, top_k: Any = None) -> Prediction:
        """Classify one image file; returns the top-k classes with their probabilities."""
        try:
            if isinstance(image, RequestProblem):
                raise image
            k = _parse_top_k(top_k, len(self.classes))
            glyphs = await self._glyphs([image], "predict")
            probabilities = await self._classify(glyphs)
        except RequestProblem as problem:
            _IMAGES.labels(endpoint="predict", outcome="rejected").inc()
            return problem.response()  # type: ignore[return-value]  # BentoML sends a Response as is
        _IMAGES.labels(endpoint="predict", outcome="classified").inc()
        _REQUEST_IMAGES.labels(endpoint="predict").observe(1)
        return Prediction(model_version=MODEL_INFO["registry_version"], predictions=self._top(probabilities[0], k))

    @bentoml.api(route="/predict_batch", input_spec=PredictBatchInput)
    async def predict_batch(self, images: Any, top_k: Any = None) -> BatchPrediction:
        """Classify several image files in one request (multipart ``images`` or JSON ``images_base64``)."""
        try:
            if isinstance(images, RequestProblem):
                raise images
            k = _parse_top_k(top_k, len(self.classes))
            glyphs = await self._glyphs(images, "predict_batch")
            probabilities = await self._classify(glyphs)
        except RequestProblem as problem:
            _IMAGES.labels(endpoint="predict_batch", outcome="rejected").inc()
            return problem.response()  # type: ignore[return-value]
        _IMAGES.labels(endpoint="predict_batch", outcome="classified").inc(len(images))
        _REQUEST_IMAGES.labels(endpoint="predict_batch").observe(len(images))
        results = [ImageResult(filename=upload.filename, predictions=self._top(row, k))
                   for upload, row in zip(images, probabilities, strict=True)]
        return BatchPrediction(model_version=MODEL_INFO["registry_version"], results=results)

    @bentoml.api(route="/glyph", input_spec=PredictInput)
    async def glyph(self, image: Any, top_k: Any = None) -> Annotated[Path, ContentType("image/png")]:
        """The 28x28 glyph the model reads for one image file (pipeline.imaging's preprocessing), as a PNG.

        Read-only: nothing is classified or counted. ``top_k`` is accepted (the form is predict's) and unused.
        """
        try:
            if isinstance(image, RequestProblem):
                raise image
            glyphs = await self._glyphs([image], "predict")  # one image: predict's wording in errors
        except RequestProblem as problem:
            return problem.response()  # type: ignore[return-value]
        return Response(_png(glyphs[0]), media_type="image/png")  # type: ignore[return-value]

    async def _classify(self, glyphs: np.ndarray) -> np.ndarray:
        try:
            return await self.engine.to_async.classify(glyphs)
        except bentoml.exceptions.BentoMLException as exc:
            # The engine's queue cannot meet serve.max_latency_ms: shed load with a retryable 503.
            raise RequestProblem(503, "overloaded", f"the model server is overloaded ({exc}); retry shortly "
                                 "or raise serve.max_latency_ms", retry_after_s=1) from None

    async def _glyphs(self, uploads: list[_Upload], endpoint: str) -> np.ndarray:
        """Decode and preprocess in a worker thread (Pillow releases the GIL while decoding)."""

        def work() -> np.ndarray:
            glyphs = []
            for index, upload in enumerate(uploads):
                try:
                    glyphs.append(load_glyph(upload.data, LIMITS))
                except ImageError as exc:
                    where = "the image" if endpoint == "predict" else f"image {index}"
                    name = f" ({upload.filename})" if upload.filename else ""
                    raise RequestProblem(422, "invalid_image", f"{where}{name}: {exc}",
                                         field="image" if endpoint == "predict" else "images",
                                         **({} if endpoint == "predict" else {"index": index})) from None
            return np.stack(glyphs)

        return await anyio.to_thread.run_sync(work, limiter=self.decoders)

    def _top(self, probabilities: np.ndarray, k: int) -> list[ClassScore]:
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [ClassScore(index=int(i), codepoint=self.classes[i][0], char=self.classes[i][1],
                           probability=float(probabilities[i])) for i in order]


Kuzushiji.add_asgi_middleware(ModelVersionHeaders)
