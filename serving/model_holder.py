"""The served model, swapped while the service runs: a new champion is loaded and checked beside the old one,
then new requests go to it while the batches already queued finish on the old session (none is dropped).

A worker swaps on ``POST /admin/reload`` (serving/admin.py), when the reload marker that another worker of
the same server bumped changes, or when polling the store finds another champion (benchmarks/SERVE.md).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from pipeline.contract import (
    CLASSMAP_FILE,
    GLYPH_SIDE,
    META_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ClassMap,
    DataError,
    Trust,
    load_classmap,
    onnx_session,
)
from pipeline.files import write_json
from serving.batcher import MicroBatcher
from serving.verdicts import load_trust

log = logging.getLogger("kuzushiji.service")
MARKER_ENV = "KUZUSHIJI_RELOAD_MARKER"  # a path shared by every worker that should follow a reload
WARMUP_ROWS = 2
MODEL_HEADERS = ("x-model-version", "x-bento-model")  # on every response: the model that answered

SERVED_MODEL = bentoml.metrics.Gauge(
    name="kuzushiji_served_model",
    documentation="1 for the model a worker serves, 0 for one it served before (labels say which)",
    labelnames=["bento_model", "registry_version"],
    multiprocess_mode="liveall",
)
RELOADS = bentoml.metrics.Counter(
    name="kuzushiji_model_reloads",
    documentation="model reloads by outcome: swapped, unchanged (already served) or rejected (bad model)",
    labelnames=["trigger", "outcome"],
)


class ModelRejected(RuntimeError):
    """A model that cannot serve: the message says which model, why, and that the old one still serves."""


@dataclass
class ServedModel:
    """One loaded model: what answers a request, and what the request says about it."""

    tag: str
    info: dict[str, Any]
    classmap: ClassMap
    batcher: MicroBatcher
    trust: Trust | None = None  # the confident / in_domain thresholds of its meta.json (serving/verdicts.py)
    active: int = 0  # requests between admission to the batcher and their answer
    retired: bool = False

    @property
    def version(self) -> str:
        return str(self.info["registry_version"])

    @property
    def headers(self) -> dict[str, str]:
        return dict(zip(MODEL_HEADERS, (self.version, self.tag), strict=True))


def classify(session: Any, glyphs: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) glyphs -> float32 (N, classes) calibrated logits (the temperature is in the graph)."""
    images = glyphs.astype(np.float32)[:, None]  # raw 0..255; the model normalises inside
    (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: images})
    return logits


def model_info(stored: Any, source: str) -> dict[str, Any]:
    """What ``/version`` says about a stored BentoML model."""
    meta = dict(stored.info.metadata)
    return {
        "bento_model": str(stored.tag),
        "model_source": source,
        "registry_model": meta.get("registry_model"),
        "registry_version": str(meta.get("registry_version", stored.tag.version)),
        "dataset": meta.get("dataset"),
        "metrics": meta.get("metrics", {}),
        "num_classes": meta.get("num_classes"),
        "tta_rotations_deg": meta.get("tta_rotations_deg", []),
        "created": stored.info.creation_time.isoformat(),
    }


def stored_model(tag: str) -> Any:
    """The BentoML model ``tag`` names (``name:latest`` resolved), or ModelRejected saying it is not there."""
    try:
        return bentoml.models.get(tag)
    except (bentoml.exceptions.NotFound, ValueError) as exc:
        raise ModelRejected(f"model {tag} is not in the BentoML store ({exc})") from None


def _check_signature(session: Any, tag: str, classes: int) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [item.name for item in inputs] != [ONNX_INPUT] or inputs[0].type != "tensor(float)":
        got = [(item.name, item.type) for item in inputs]
        raise ModelRejected(f"model {tag}: its ONNX graph takes {got}; the service feeds one float input "
                            f"{ONNX_INPUT!r}")
    shape = list(inputs[0].shape)  # a named (dynamic) dimension is checked by the test run below
    fixed = (1, GLYPH_SIDE, GLYPH_SIDE)
    if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], fixed, strict=True)):
        raise ModelRejected(f"model {tag}: its input has shape {shape}; the service feeds (N, 1, {GLYPH_SIDE}, "
                            f"{GLYPH_SIDE}) glyphs")
    named = {item.name: list(item.shape) for item in outputs}
    if ONNX_OUTPUT not in named:
        raise ModelRejected(f"model {tag}: its ONNX graph has no output {ONNX_OUTPUT!r} (it has {sorted(named)})")
    out = named[ONNX_OUTPUT]
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != classes):
        raise ModelRejected(f"model {tag}: its output has shape {out}; its class map has {classes} classes, so "
                            f"(N, {classes}) was expected")


def load_model(tag: str, *, source: str, threads: int, max_batch: int,
               on_batch: Callable[[int], None] | None = None) -> ServedModel:
    """Load and check one stored model (session, signature, a warm-up run); ModelRejected says what is wrong."""
    stored = stored_model(tag)
    tag = str(stored.tag)
    try:
        classmap = load_classmap(Path(stored.path_of(CLASSMAP_FILE)))
    except DataError as exc:
        raise ModelRejected(f"model {tag}: bad class map: {exc}") from None
    try:
        session = onnx_session(Path(stored.path_of(ONNX_FILE)), threads)
    except Exception as exc:  # onnxruntime raises its own types for corrupt or unsupported graphs
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelRejected(f"model {tag}: {ONNX_FILE} is not a loadable ONNX model ({first})") from None
    _check_signature(session, tag, len(classmap))
    engine = partial(classify, session)
    try:  # warm-up: allocate once, now, and see the real output
        logits = engine(np.zeros((WARMUP_ROWS, GLYPH_SIDE, GLYPH_SIDE), dtype=np.uint8))
    except Exception as exc:
        raise ModelRejected(f"model {tag}: a test run failed ({str(exc)[:300]})") from None
    if logits.shape != (WARMUP_ROWS, len(classmap)) or not np.isfinite(logits).all():
        raise ModelRejected(f"model {tag}: a test run gave {logits.shape} outputs (finite: "
                            f"{bool(np.isfinite(logits).all())}); ({WARMUP_ROWS}, {len(classmap)}) expected")
    return ServedModel(tag, model_info(stored, source), classmap, MicroBatcher(engine, max_batch, on_batch),
                       load_trust(Path(stored.path_of(META_FILE))))


def marker_path(server_pid: int | None = None) -> Path:
    """The reload marker of one server: $KUZUSHIJI_RELOAD_MARKER, else one per server process (workers are
    its children) in the temp folder."""
    if os.environ.get(MARKER_ENV):
        return Path(os.environ[MARKER_ENV])
    return Path(tempfile.gettempdir()) / f"kuzushiji-model-{server_pid or os.getppid()}"


def own_marker() -> None:
    """In the server process (not a worker): drop a marker a recycled pid left, and this server's at exit."""
    if os.environ.get(MARKER_ENV) or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    path = marker_path(os.getpid())
    path.unlink(missing_ok=True)
    atexit.register(path.unlink, missing_ok=True)


def _marker_tag(path: Path, seen: tuple[int, int] | None) -> tuple[str | None, tuple[int, int] | None]:
    """(the tag the marker names, its identity) when it changed since ``seen``, else (None, ``seen``)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None, seen
    identity = (status.st_ino, status.st_mtime_ns)
    if identity == seen:
        return None, seen
    try:
        tag = json.loads(path.read_text(encoding="utf-8"))["tag"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, seen  # being replaced or foreign: look again next time
    return (tag if isinstance(tag, str) else None), identity


class ModelHolder:
    """The served model of one worker and how it changes: ``serving()`` for a request, ``reload()`` for the
    admin endpoint, ``follow()`` (every ``follow_s``) for the marker and, every ``poll_s`` when on, the store."""

    def __init__(self, first: ServedModel, load: Callable[[str], ServedModel], champion: Callable[[], str],
                 marker: Path | None = None, follow_s: float = 0.5, poll_s: float = 0.0) -> None:
        self._current = first
        self._load, self._champion = load, champion
        self.marker, self.follow_s, self.poll_s = marker, follow_s, poll_s
        self._seen: tuple[int, int] | None = None
        self._last_poll = time.monotonic()
        self._rejected: dict[str, str] = {}  # tag -> why: a bad model found by polling is tried once
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        SERVED_MODEL.labels(bento_model=first.tag, registry_version=first.version).set(1)

    @property
    def current(self) -> ServedModel:
        return self._current

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[ServedModel]:
        """The model that answers this request, kept open until the answer, whatever swaps meanwhile."""
        served = self._current
        served.active += 1
        try:
            yield served
        finally:
            served.active -= 1
            if served.retired and served.active == 0:
                served.batcher.close()

    async def reload(self, trigger: str = "admin") -> dict[str, Any]:
        """Swap to the store's champion if it is another model; the marker tells the other workers.

        ModelRejected (the old model still serving) when the champion cannot be loaded or differs in classes.
        """
        async with self._lock:
            try:
                tag = await asyncio.to_thread(self._champion_tag)
                previous = await self._swap_to(tag, trigger)
            except ModelRejected:
                RELOADS.labels(trigger=trigger, outcome="rejected").inc()
                raise
            if previous is not None and self.marker is not None:
                marked = {"tag": tag, "by_pid": os.getpid(), "at": time.time()}
                await asyncio.to_thread(write_json, self.marker, marked)  # atomic: a reader sees old or new
                self._seen = _marker_tag(self.marker, None)[1]
        return {"swapped": previous is not None, "model": self._current.info,
                "previous": previous.info if previous is not None else None, "worker_pid": os.getpid()}

    async def follow(self) -> None:
        """One cheap look for another model to serve: the marker (a stat), and the store when a poll is due."""
        tag, trigger = None, "marker"
        if self.marker is not None:
            tag, self._seen = _marker_tag(self.marker, self._seen)
        if tag is None and self.poll_s > 0 and time.monotonic() - self._last_poll >= self.poll_s:
            self._last_poll, trigger = time.monotonic(), "poll"
            try:
                tag = await asyncio.to_thread(self._champion_tag)
            except ModelRejected as exc:
                self._note_rejected("poll", str(exc))
                return
        if tag is None or tag == self._current.tag or tag in self._rejected:
            return
        async with self._lock:
            try:
                await self._swap_to(tag, trigger)
            except ModelRejected as exc:
                RELOADS.labels(trigger=trigger, outcome="rejected").inc()
                self._note_rejected(tag, str(exc))

    def start(self) -> None:
        """Follow in the background, from within the worker's event loop."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="model-follower")

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            try:
                await self.follow()
            except Exception:  # a follower that dies would leave this worker on the old model for good
                log.exception("checking for a new model failed; trying again in %.1f s", self.follow_s)
            await asyncio.sleep(self.follow_s)

    def _champion_tag(self) -> str:
        return str(stored_model(self._champion()).tag)

    async def _swap_to(self, tag: str, trigger: str) -> ServedModel | None:
        """Load ``tag`` beside the served model and swap (under the lock); the old one, or None if unchanged."""
        old = self._current
        if tag == old.tag:
            RELOADS.labels(trigger=trigger, outcome="unchanged").inc()
            return None
        started = time.perf_counter()
        new = await asyncio.to_thread(self._load, tag)
        if new.classmap != old.classmap:
            new.batcher.close()
            raise ModelRejected(
                f"model {tag} has {len(new.classmap)} classes {''.join(new.classmap.chars[:12])}...; the served "
                f"{old.tag} has {len(old.classmap)} {''.join(old.classmap.chars[:12])}...: a model with other "
                "classes changes what clients' class indices mean and needs a new deployment"
            )
        self._current = new  # requests admitted from now on; those queued on the old batcher finish there
        old.retired = True
        if old.active == 0:
            old.batcher.close()
        SERVED_MODEL.labels(bento_model=old.tag, registry_version=old.version).set(0)
        SERVED_MODEL.labels(bento_model=new.tag, registry_version=new.version).set(1)
        RELOADS.labels(trigger=trigger, outcome="swapped").inc()
        self._rejected.pop(tag, None)
        log.warning("now serving %s (version %s) instead of %s (version %s), loaded in %.0f ms (%s)", new.tag,
                 new.version, old.tag, old.version, 1000 * (time.perf_counter() - started), trigger)
        return old

    def _note_rejected(self, key: str, why: str) -> None:
        if self._rejected.get(key) != why:
            log.error("%s; still serving %s", why, self._current.tag)
        self._rejected[key] = why
