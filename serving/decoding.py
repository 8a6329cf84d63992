"""Where uploads are decoded: by their decoded size (header width x height), small ones on the event loop
(a thread hop costs as much as a glyph), large ones in low-priority threads so they cannot starve it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from serving.limits import RequestLimits
from serving.requests import Upload, decode_glyphs, request_pixels

INLINE_DECODE_PIXELS = 256 * 256  # about a millisecond of decoding; above, a thread (benchmarks/SERVE.md)
DECODE_NICENESS = 10  # large decodes yield the cores to the event loops and the engine


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # per thread on Linux; elsewhere a no-op
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


class Decoder:
    """Glyphs of one request's uploads, within the request's pixel budget."""

    def __init__(self, limits: RequestLimits, threads: int) -> None:
        self.limits = limits
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=_lower_priority)

    async def glyphs(self, uploads: Sequence[Upload], batch: bool) -> np.ndarray:
        pixels = request_pixels(uploads, self.limits)  # 413 before any decoding
        decode = partial(decode_glyphs, uploads, self.limits.image, batch)
        if pixels <= INLINE_DECODE_PIXELS:
            return decode()
        return await asyncio.get_running_loop().run_in_executor(self.pool, decode)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
