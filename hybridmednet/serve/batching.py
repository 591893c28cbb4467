"""Micro-batching: one worker thread runs the model, so inference never blocks the event loop, and
requests that arrive together share one forward pass.

The worker takes the first queued request, then gathers more while the batch has room, for at most
`wait_s`, and only while other requests are on their way (being received or decoded): a lone request
never waits for company that is not coming.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar('T')
R = TypeVar('R')

# On a CPU one forward pass already keeps every core busy, and a batch that outgrows the caches costs more
# per image: convnext_tiny on 2 cores, ms per image at batch 1, 2, 4, 6, 8: 58, 53, 54, 57, 59 at 224 px;
# at batch 1, 2, 4: 121, 128, 136 at 320 px and 302, 331, 359 at 512 px (docs/benchmarks.md, "Serving").
# Batches of up to about 4 x 224 x 224 input pixels pay. A GPU gains from larger ones.
CPU_BATCH_PIXELS = 4 * 224 * 224
GPU_MAX_BATCH = 8


def default_max_batch(device: str, image_size: int) -> int:
    """The most images per forward pass when `--max-batch` is not given: on the CPU 4 at 224 px, 1 from 320 px."""
    if device.split(':')[0] != 'cpu':
        return GPU_MAX_BATCH
    return max(1, CPU_BATCH_PIXELS // image_size**2)


@dataclass
class _Job(Generic[T]):
    item: T
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Arrival:
    """A request on its way to the queue; the worker waits for it while it is open."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._count_arrival(-1)


class MicroBatcher(Generic[T, R]):
    """`run(items) -> results` (same length and order) on a worker thread, up to `max_batch` items at a time."""

    def __init__(
        self,
        run: Callable[[Sequence[T]], Sequence[R]],
        max_batch: int,
        wait_s: float,
        on_batch: Callable[[int], Any] | None = None,  # called with each batch's size (metrics)
    ):
        self.run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job[T] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._arriving = 0
        self._thread = threading.Thread(target=self._work, name='hybridmednet-inference', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _count_arrival(self, delta: int) -> None:
        with self._lock:
            self._arriving += delta

    @contextmanager
    def expecting(self) -> Iterator[Arrival]:
        """Open while a request is received and decoded; `submit` closes it once the request is queued."""
        self._count_arrival(1)
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.close()

    async def submit(self, item: T, arrival: Arrival | None = None) -> R:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(item, future, loop))
        if arrival is not None:
            arrival.close()
        return await future

    def _gather(self, first: _Job[T]) -> tuple[list[_Job[T]], bool]:
        """The batch that starts with `first`, and whether the stop sentinel was met."""
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 or self._arriving == 0:
                    break
                try:
                    job = self._queue.get(timeout=min(left, 0.001))
                except queue.Empty:
                    continue
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = self.run([job.item for job in batch])
            except Exception as exc:  # a bug in run: every request of the batch gets it (a 500), the worker goes on
                for job in batch:
                    job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
                continue
            for job, result in zip(batch, results):
                job.loop.call_soon_threadsafe(_settle, job.future, result, None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
