"""Scoring rollout batches while the next batch samples: the rewards run on one worker thread (on the
stream the decode queued on), in submission order; ``fastcps.rollout.rollout_epoch`` submits each decoded
batch and collects the scores at the end of the epoch."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch


class RewardWorker:
    """Scores rollout batches in submission order: on one worker thread (``enabled``) or at once in
    the caller's thread. ``collect()`` returns the finished scores (waiting for them) and re-raises a
    reward's exception; ``busy_time`` sums the reward calls' own wall time."""

    def __init__(self, reward_fn, enabled: bool = True):
        self.reward_fn = reward_fn
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcps-reward") if enabled else None
        )
        self.pending: list = []
        self.busy_time = 0.0

    def _score(self, images, prompts, metadata, stream):
        t0 = time.perf_counter()
        try:
            if stream is None:
                return self.reward_fn(images, prompts, metadata)
            with torch.cuda.device(stream.device), torch.cuda.stream(stream):
                return self.reward_fn(images, prompts, metadata)
        finally:
            self.busy_time += time.perf_counter() - t0

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> None:
        if self.pool is None:
            self.pending.append(_Done(self._score(images, prompts, metadata, None)))
            return
        stream = None
        if images.device.type == "cuda" and torch.cuda.is_available():  # not for fake CUDA tensors
            index = images.device.index if images.device.index is not None else torch.cuda.current_device()
            stream = torch.cuda.current_stream(index)  # this thread's: the one the decode queued on
        self.pending.append(self.pool.submit(self._score, images, prompts, metadata, stream))

    def collect(self) -> list:
        out = [f.result() for f in self.pending]
        self.pending.clear()
        return out

    def close(self) -> None:
        """Drop queued work (an exception or a stop is leaving the rollout) and wait for the running call."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


class _Done(NamedTuple):
    value: object

    def result(self):
        return self.value
