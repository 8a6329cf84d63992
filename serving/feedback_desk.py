"""The ``/feedback`` answer: read and check the correction like ``/predict`` reads an upload, classify it with
the served model (for the agreement metric), spend the client's write allowance, store it off the event
loop; a store that is down or full is a 503 that leaves ``/predict`` untouched."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.contract import ClassMap
from pipeline.feedback_store import Feedback, FeedbackStore, StoreUnavailable, store_url, upload_digest
from serving.decoding import Decoder
from serving.errors import RequestRejected
from serving.feedback import RateLimiter, class_list, client_address, feedback_request, store_down
from serving.intake import Intake, read_body
from serving.limits import body_limit, declared_length

Classify = Callable[[np.ndarray], Awaitable[np.ndarray]]  # uint8 (N, 28, 28) -> (N, classes) probabilities

RECEIVED = bentoml.metrics.Counter(
    name="kuzushiji_feedback_received", documentation="POST /feedback requests received")
OUTCOMES = bentoml.metrics.Counter(
    name="kuzushiji_feedback_outcomes",
    documentation="feedback by outcome: accepted (stored), duplicate, rejected, rate_limited, unavailable",
    labelnames=["outcome"])
AGREEMENT = bentoml.metrics.Counter(
    name="kuzushiji_feedback_agreement",
    documentation="stored feedback whose label agrees with the served model's top-1 (agrees=true) or not",
    labelnames=["agrees"])


class FeedbackDesk:
    """One worker's ``/feedback``: its store (opened on first use, reopened after a failure), its limiter."""

    def __init__(self, settings: Any, root: Path, intake: Intake, decoder: Decoder) -> None:
        self.url, self.timeout_s = store_url(settings.store, root), settings.store_timeout_s
        self.limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst)
        self.intake, self.decoder = intake, decoder
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="feedback-store")  # one write at a time
        self.store: FeedbackStore | None = None

    def _write(self, feedback: Feedback) -> tuple[int, bool]:
        if self.store is None:
            self.store = FeedbackStore(self.url, self.timeout_s)
        return self.store.add(feedback)

    @staticmethod
    def classes(classmap: ClassMap) -> Response:
        """GET /feedback: the classes a label may name (the page's grid of choices)."""
        return JSONResponse({"classes": class_list(classmap, detail=True)})

    async def answer(self, request: Request, classmap: ClassMap, classify: Classify, model_version: str) -> Response:
        RECEIVED.inc()
        try:
            item, created = await self._accept(request, classmap, classify, model_version)
        except RequestRejected as rejected:
            outcome = {429: "rate_limited", 503: "unavailable"}.get(rejected.status, "rejected")
            OUTCOMES.labels(outcome=outcome).inc()
            response = rejected.response()
            if rejected.status == 429:
                response.headers["retry-after"] = str(rejected.extra.get("retry_after_s", 1))
                response.headers["connection"] = "close"  # its body may be left unread
            return response
        OUTCOMES.labels(outcome="accepted" if created else "duplicate").inc()
        return JSONResponse(item, 201 if created else 200)

    async def _accept(self, request: Request, classmap: ClassMap, classify: Classify,
                      model_version: str) -> tuple[dict[str, Any], bool]:
        content_type = request.headers.get("content-type")
        limit = body_limit(content_type, False, self.intake.limits)
        declared = declared_length(request.headers.get("content-length"), limit)
        async with self.intake.budget.reserve(declared if declared is not None else limit):
            body = await read_body(request.receive, limit, self.intake.idle_timeout_s, declared)
            sent = feedback_request(body, content_type, self.intake.limits, classmap)
            glyph = (await self.decoder.glyphs([sent.upload], batch=False))[0]
        self.limiter.take(client_address(request.scope))  # valid writes only count against the client
        predicted = int(np.argmax((await classify(glyph[None]))[0]))
        feedback = Feedback(glyph=glyph, digest=upload_digest(sent.upload.data), label=sent.label,
                            label_char=classmap.chars[sent.label], predicted=predicted, model_version=model_version,
                            client_predicted=sent.predicted, client_model_version=sent.model_version)
        try:
            item_id, created = await asyncio.get_running_loop().run_in_executor(self.writer, self._write, feedback)
        except StoreUnavailable as exc:
            if self.store is not None:
                self.store.close()
            self.store = None  # the next request opens it afresh
            raise store_down(str(exc)) from None
        if created:
            AGREEMENT.labels(agrees=str(predicted == sent.label).lower()).inc()
        return {"id": item_id, "duplicate": not created, "label": sent.label, "char": classmap.chars[sent.label],
                "predicted": predicted, "model_version": model_version}, created
