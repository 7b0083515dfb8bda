"""``remote``: a reward scored by a reward service (``python -m fastcps.rewards.serve``), so that one copy
of a large reward model (PickScore's 3.7 GiB) serves every rank of a run, or runs on another machine,
instead of one copy on every training GPU.

Config: ``{"name": "remote", "args": {"url": "http://host:8000", "name": "pickscore"}}``. Each rank
sends its images (8-bit levels, lossless for what image-model rewards score: ``service.wire``) in
requests of ``batch_size`` images; the service batches the requests of all ranks together.

Failures: a request that cannot connect, times out (``timeout_s``) or is answered 502/503/504 (the
service restarting or still loading) is retried ``retries`` times, waiting ``backoff_s * 2^(k-1)`` s
before retry k; then, or at once on any other error answer (a malformed request: 4xx; the reward raised:
500, with the service's message), the reward raises ``RemoteRewardError`` naming the URL and the last
error: the trainer stops with exit code 3. At start-up (``preflight``, before any model loads, on every
rank) the service must answer ``GET /health`` (same retries) and its reward be ready (waiting up to
``timeout_s`` while it loads), else the run stops at once, exit code 3: the code of a reward that cannot
load or fails during the run.

Edit rows: when the service's /health says ``"source_images": true`` (an ``image_similarity`` service), each
request also carries its rows' source images (``metadata["source_images"][0]``, opened and resized to the
generated size here as the anchor does), so the service needs none of the trainer's files (``service.wire``).

Nothing to download (``files``) and no GPU memory in the plan (``fastcps.plan``). The served reward sees
the images' 8-bit levels: the same numbers as in process for every image-model reward; the toy's
``digit`` reward, which reads unquantised floats in process, differs by that quantisation.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request

import torch
from pydantic import Field, field_validator

from fastcps.rewards import RewardArgs
from fastcps.rewards._util import batches, check_inputs
from fastcps.rewards.service import wire

__all__ = ["RemoteReward", "RemoteRewardError"]

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0  # a health check's own answer is immediate; a larger timeout_s is for scoring
LOADING_POLL_S = 1.0


class RemoteRewardError(RuntimeError):
    """The reward service failed (after its retries where retrying made sense); the message names its URL
    and the last error."""


class _Retryable(Exception):
    """A failure worth a retry: no connection, a timeout, the service restarting or loading."""


class RemoteReward:
    name = "remote"

    class Args(RewardArgs):
        url: str = Field("", validate_default=True)
        """The reward service, `http://host:port` (`python -m fastcps.rewards.serve --port P`)."""
        name: str = "remote"
        """The name its score is logged under (`reward/<name>/mean`, `eval/<name>`): give each remote reward
        in `rewards` its own."""
        serves: str | None = None
        """The reward the service must serve (its /health `reward`), checked at start-up; None = any."""
        timeout_s: float = Field(60.0, gt=0)
        """Seconds a request waits for its answer (the service may be scoring other ranks' images first)."""
        retries: int = Field(3, ge=0)
        """Retries after a failed attempt (no connection, a timeout, HTTP 502/503/504)."""
        backoff_s: float = Field(1.0, ge=0)
        """Wait before retry k: backoff_s * 2^(k-1) seconds (1, 2, 4 s by default)."""
        batch_size: int = Field(16, ge=1)
        """Images per request."""

        @field_validator("url")
        @classmethod
        def _http_url(cls, url: str) -> str:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"the reward service's address must be http(s)://host:port, got {url!r} "
                    "(start one with `python -m fastcps.rewards.serve --reward NAME --port P`)"
                )
            return url.rstrip("/")

    def __init__(
        self,
        url: str = "",
        name: str = "remote",
        serves: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        batch_size: int = 16,
    ):
        a = self.Args(
            url=url,
            name=name,
            serves=serves,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            batch_size=batch_size,
        )
        self.url, self.label, self.serves = a.url, a.name, a.serves
        self.timeout_s, self.retries, self.backoff_s, self.batch_size = (
            a.timeout_s,
            a.retries,
            a.backoff_s,
            a.batch_size,
        )
        self._wants_sources: bool | None = None  # the service's /health "source_images", once checked
        self._source_cache = None

    @classmethod
    def component_name(cls, args: dict) -> str:
        return str(args.get("name", "remote"))

    @classmethod
    def files(cls, args: dict) -> list:
        """Nothing: the service has the reward's files."""
        return []

    @classmethod
    def preflight(cls, args: dict) -> None:
        """The trainer's start-up check, before any model loads: ``check``."""
        cls(**args).check()

    def load(self, device=None) -> None:
        """Nothing loads here: the service's reward is checked ready (``check``)."""
        self.check()

    def check(self) -> dict:
        """The service's /health once it answers (with retries) and its reward is ready (waiting up to
        ``timeout_s`` while it loads); RemoteRewardError otherwise."""
        t0 = time.monotonic()
        while True:
            health = self._request("GET", "/health", None, min(self.timeout_s, HEALTH_TIMEOUT_S))
            if not isinstance(health, dict) or "ready" not in health or "reward" not in health:
                raise RemoteRewardError(
                    f"{self.url}/health did not answer as a fastcps reward service does: {str(health)[:200]}"
                )
            if self.serves is not None and health["reward"] != self.serves:
                raise RemoteRewardError(
                    f"the reward service at {self.url} serves {health['reward']!r}, the config expects "
                    f"{self.serves!r} (rewards[].args.serves)"
                )
            if health["ready"]:
                self._wants_sources = bool(health.get("source_images", False))  # older services: no key
                return health
            if health.get("error"):
                raise RemoteRewardError(
                    f"the reward service at {self.url} could not load {health['reward']!r}: {health['error']}"
                )
            if time.monotonic() - t0 > self.timeout_s:
                raise RemoteRewardError(
                    f"the reward service at {self.url} still loads {health['reward']!r} after "
                    f"{self.timeout_s:g} s (rewards[].args.timeout_s)"
                )
            time.sleep(LOADING_POLL_S)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> torch.Tensor:
        check_inputs(self.label, images, prompts, metadata)
        scores: list[float] = []
        for part in batches(len(prompts), self.batch_size):
            meta = None if metadata is None else list(metadata[part])
            sources = self._sources(meta, images.shape[-2:])
            try:
                body = wire.encode(images[part], list(prompts[part]), meta, sources)
            except TypeError as err:  # json: metadata the service cannot be sent
                raise ValueError(f"reward {self.label!r}: the prompts' metadata is not JSON: {err}") from err
            answer = self._request("POST", "/score", body, self.timeout_s)
            try:
                scores += wire.scores_from_json(answer, part.stop - part.start)
            except ValueError as err:
                raise RemoteRewardError(f"the reward service at {self.url}: {err}") from None
        return torch.tensor(scores, dtype=torch.float32)

    def _sources(self, meta: list[dict] | None, hw) -> torch.Tensor | None:
        """uint8 [B, 3, H, W]: the rows' first source images, resized to the generated size as the anchor
        does, when every row is an edit row and the service asks for them (its /health, checked once)."""
        from fastcps.edit_images import SOURCE_IMAGES, ImageCache

        if not meta or not all(isinstance(m, dict) and m.get(SOURCE_IMAGES) for m in meta):
            return None
        if self._wants_sources is None:
            self.check()
        if not self._wants_sources:
            return None
        size = (int(hw[0]), int(hw[1]))
        if self._source_cache is None or self._source_cache.size != size:
            # a GRPO group shares one source image: decoded once (ImageCache keeps uint8, returns k/255)
            self._source_cache = ImageCache(size, max_bytes=2**28)
        imgs = []
        for i, m in enumerate(meta):
            ref = str(m[SOURCE_IMAGES][0])
            try:
                imgs.append(self._source_cache.get(ref))
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"reward {self.label!r}: the source image {ref!r} of a request's row {i} cannot be read "
                    f"here to send to the service at {self.url}: {type(err).__name__}: {err}"
                ) from err
        return torch.stack(imgs).mul_(255).round_().to(torch.uint8)

    def _request(self, method: str, path: str, body: bytes | None, timeout: float):
        """The JSON answer of one request, retried as the module doc says."""
        t0, last = time.monotonic(), None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "reward %r: %s %s%s failed (%s); retry %d/%d in %.1f s",
                    self.label, method, self.url, path, last, attempt, self.retries, wait,
                )  # fmt: skip
                time.sleep(wait)
            try:
                return self._once(method, path, body, timeout)
            except _Retryable as err:
                last = err
        raise RemoteRewardError(
            f"the reward service at {self.url} did not answer {method} {path} after {self.retries + 1} "
            f"attempts in {time.monotonic() - t0:.1f} s (rewards[].args: timeout_s {self.timeout_s:g}, "
            f"retries {self.retries}, backoff_s {self.backoff_s:g}); last error: {last}. Is "
            "`python -m fastcps.rewards.serve` running there?"
        )

    def _once(self, method: str, path: str, body: bytes | None, timeout: float):
        headers = {"Content-Type": wire.CONTENT_TYPE} if body is not None else {}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = _detail(err)
            if err.code in (502, 503, 504):
                raise _Retryable(f"HTTP {err.code}: {detail}") from None
            raise RemoteRewardError(
                f"the reward service at {self.url} answered {method} {path} with HTTP {err.code}: {detail}"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # OSError: timeouts too
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            raise _Retryable(f"{type(reason).__name__}: {reason}" if str(reason) else repr(reason)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteRewardError(
                f"the reward service at {self.url}: the answer to {method} {path} is not JSON: {raw[:200]!r}"
            ) from None


def _detail(err: urllib.error.HTTPError) -> str:
    """The service's ``{"detail": ...}`` message, else the answer's first bytes."""
    try:
        raw = err.read()
    except OSError:
        return err.reason or ""
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else raw[:300].decode(errors="replace")
