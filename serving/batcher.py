"""An asyncio micro-batcher: concurrent requests of one process share one engine run, with no timer, so
a lone request runs at once and batches grow with load (how it behaves: benchmarks/SERVE.md)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Engine = Callable[[np.ndarray], np.ndarray]  # (N, ...) inputs -> (N, ...) outputs, row i for input i


class MicroBatcher:
    """Merge concurrent :meth:`run` calls into batched calls of ``engine`` (in one thread of its own, so the
    loop parses meanwhile); ``on_batch(images)`` sees each run's size. A larger request runs alone, whole."""

    def __init__(
        self, engine: Engine, max_batch_size: int, on_batch: Callable[[int], None] | None = None
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._pending: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def run(self, inputs: np.ndarray) -> np.ndarray:
        """The engine's outputs for ``inputs`` (N rows), computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._drain(), name="micro-batcher")
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((inputs, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        size = 0
        while self._pending:
            inputs, future = self._pending[0]
            if future.done():  # the client went away (request cancelled): do not compute for it
                self._pending.popleft()
                continue
            if batch and size + len(inputs) > self._max_batch_size:
                break
            batch.append(self._pending.popleft())
            size += len(inputs)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while batch := self._next_batch():
                inputs = batch[0][0] if len(batch) == 1 else np.concatenate([item for item, _ in batch])
                if self._on_batch is not None:
                    self._on_batch(len(inputs))
                try:
                    outputs = await loop.run_in_executor(self._executor, self._engine, inputs)
                except Exception as exc:  # each waiting request gets the error; the batcher lives on
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for item, future in batch:
                    if not future.done():
                        future.set_result(outputs[start : start + len(item)])
                    start += len(item)
