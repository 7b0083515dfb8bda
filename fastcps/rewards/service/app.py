"""The reward service's HTTP app (FastAPI): ``GET /health`` and ``POST /score`` (format:
``fastcps.rewards.service.wire``), around one reward and its ``Batcher``.

The reward is built at once and loads in a background thread (``load(device)``), so that ``/health``
answers while a large model loads (``"ready": false``; ``/score`` answers 503 then, which clients retry).

Needs the ``serve`` extra (fastapi, uvicorn): only ``python -m fastcps.rewards.serve`` imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from fastcps.rewards.service import wire
from fastcps.rewards.service.batcher import Batcher

log = logging.getLogger(__name__)


class RewardService:
    """One reward, built from its registered ``name`` and ``args``, scoring on ``device`` in batches of
    up to ``max_batch`` images."""

    def __init__(self, name: str, args: dict, device: str, max_batch: int, max_wait_s: float):
        from fastcps.rewards import build_reward

        self.name, self.args, self.device = name, dict(args), torch.device(device)
        self.reward = build_reward(name, args)
        self.ready, self.error = False, None
        self.loaded = threading.Event()
        self.batcher = Batcher(self._score, max_batch, max_wait_s)

    def load(self) -> None:
        """The reward's ``load(device)`` (once, at start-up); ``error`` says why it failed."""
        try:
            load = getattr(self.reward, "load", None)
            if load is not None:
                load(self.device)
            self.ready = True
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            raise
        finally:
            self.loaded.set()

    def _score(self, pixels: np.ndarray, prompts: list[str], metadata: list[dict]) -> list[float]:
        # uint8 -> the k/255 floats the trainer hands an in-process reward (its to_uint8 gives k back); one
        # pass (true division promotes to float32), on the reward's device
        images = torch.from_numpy(pixels).to(self.device) / 255.0
        with torch.no_grad():
            r = self.reward(images, prompts, metadata)
        r = torch.as_tensor(r, dtype=torch.float32).reshape(-1).cpu()
        if r.shape[0] != len(prompts):
            raise RuntimeError(f"returned {r.shape[0]} values for {len(prompts)} images")
        return r.tolist()

    def health(self) -> dict:
        c = self.batcher.counters
        return {
            "reward": self.name,
            "args": self.args,
            "device": str(self.device),
            "ready": self.ready,
            # edit rows' source pixels wanted in requests (wire.py): a reward scoring against them
            "source_images": bool(getattr(self.reward, "wants_source_images", False)),
            "error": self.error,
            "max_batch": self.batcher.max_batch,
            "max_wait_ms": self.batcher.max_wait_s * 1000,
            "requests": c.requests,
            "batches": c.batches,
            "images": c.images,
            "largest_batch": c.largest_batch,
        }


async def read_body(request: Request, max_bytes: int) -> bytearray:
    """The body, refused with 413 past ``max_bytes`` (before reading it when Content-Length says so).
    A bytearray: the pixels' numpy view of it is writable, so torch takes it without a copy."""
    length = request.headers.get("content-length")
    too_large = f"request body larger than the service's limit of {max_bytes} bytes (--max-body-mb)"
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise wire.BadRequest(too_large, status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise wire.BadRequest(too_large, status=413)
    return body


def create_app(service: RewardService, max_body_bytes: int):
    app = FastAPI(title=f"fastcps reward service: {service.name}")

    @app.exception_handler(wire.BadRequest)
    async def _bad_request(request: Request, err: wire.BadRequest):
        log.warning("bad request from %s: %s", request.client.host if request.client else "?", err)
        return JSONResponse(status_code=err.status, content={"detail": str(err)})

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.post("/score")
    async def score(request: Request) -> dict:
        if not service.ready:
            why = f"failed to load: {service.error}" if service.error else "is still loading"
            raise HTTPException(503, f"reward {service.name!r} {why}")
        req = wire.decode(await read_body(request, max_body_bytes))
        futures = service.batcher.submit(req.pixels, req.prompts, req.metadata_with_sources())
        try:
            parts = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as err:
            msg = f"reward {service.name!r} raised {type(err).__name__}: {err}"
            log.error("%s", msg)
            raise HTTPException(500, msg) from err
        return wire.scores_json([s for part in parts for s in part])

    return app
