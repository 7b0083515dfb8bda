"""Dynamic batching: requests that arrive while the reward is busy, or within ``max_wait_s`` of the
first, are scored in one call of up to ``max_batch`` images; each request gets its own scores back.

One thread calls the reward (models are not thread-safe and a GPU runs one batch at a time anyway); the
server's event loop only parses and waits (``asyncio.wrap_future`` on each job's Future). Only images
of the same size are merged (a batch is one tensor). A request of more than ``max_batch`` images is
scored in pieces of ``max_batch``. When a merged batch raises, each request in it is scored alone, so
that only the request whose input made the reward raise gets the error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray, list[str], list[dict]], list[float]]
"""uint8 pixels [B, C, H, W], B prompts, B metadata -> B scores."""


@dataclass(eq=False)  # a job is itself (the queue removes it by identity), not its arrays' values
class Job:
    pixels: np.ndarray
    prompts: list[str]
    metadata: list[dict]
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> tuple[int, ...]:
        return self.pixels.shape[1:]


@dataclass
class Counters:
    """What the batcher has done (the service's /health shows them)."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    largest_batch: int = 0


class Batcher:
    def __init__(self, score: ScoreFn, max_batch: int, max_wait_s: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.score, self.max_batch, self.max_wait_s = score, int(max_batch), float(max_wait_s)
        self.counters = Counters()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray, prompts: list[str], metadata: list[dict]) -> list[Future]:
        """Queue one request; one Future per piece of at most ``max_batch`` images, in order."""
        m = self.max_batch
        jobs = [
            Job(pixels[i : i + m], prompts[i : i + m], metadata[i : i + m]) for i in range(0, len(prompts), m)
        ]
        with self._cond:
            if self._closed:
                raise RuntimeError("the reward service is shutting down")
            self.counters.requests += 1
            self._queue.extend(jobs)
            self._cond.notify()
        return [j.future for j in jobs]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _take(self) -> list[Job]:
        """The next batch: the oldest job, then queued jobs of its image size that fit, waiting up to
        ``max_wait_s`` after the oldest for more while the batch is not full."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch, n = [first], len(first.prompts)
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                for job in list(self._queue):
                    if job.size == first.size and n + len(job.prompts) <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        n += len(job.prompts)
                left = deadline - time.monotonic()
                if n >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _run(self) -> None:
        while batch := self._take():
            # a job whose caller went away (its Future cancelled) is dropped; the others cannot be cancelled
            # from here on, so setting their results below cannot fail
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._score(batch)
            except Exception as err:  # a bug here must not leave requests waiting for a dead thread
                log.exception("the batcher failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)

    def _score(self, batch: list[Job]) -> None:
        pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([j.pixels for j in batch])
        prompts = [p for j in batch for p in j.prompts]
        metadata = [m for j in batch for m in j.metadata]
        try:
            scores = self.score(pixels, prompts, metadata)
        except Exception as err:
            if len(batch) > 1:  # find the request that made it raise: score each alone
                for job in batch:
                    self._score([job])
                return
            batch[0].future.set_exception(err)
            return
        c = self.counters
        c.batches, c.images = c.batches + 1, c.images + len(prompts)
        c.largest_batch = max(c.largest_batch, len(prompts))
        start = 0
        for job in batch:
            job.future.set_result(scores[start : start + len(job.prompts)])
            start += len(job.prompts)
