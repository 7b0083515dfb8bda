"""Detections from elsewhere: an HTTP detection server (``detector: server``) or the prompts' metadata
(``detector: given``). Both give ``Detector.detect(images [B,3,H,W] in [0,1], metadata) ->
list[list[Detection]]``, colours included where a colour rule needs them.

Server protocol: ``POST url`` with ``Content-Type: application/json`` and body ``{"images": [<base64 PNG>,
...], "prompts": [...], "metadata": [...]}``; the answer is ``{"detections": [[{"label": str, "box": [x1,
y1, x2, y2], "score": float, "color"?: str}, ...], ...]}`` with one list per image (boxes in pixels;
colours from GenEval's list). The PNG holds the images' 8-bit levels, ``(images * 255).round()``,
losslessly: what GenEval's own evaluator reads (it scores saved PNG files). flow_grpo's ``geneval_score``
sends the same levels as JPEG at PIL's default quality 75 (lossy) to its server.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Protocol

import torch

from fastcps.rewards._util import to_pil
from fastcps.rewards.geneval.rules import Detection

__all__ = ["Detector", "GivenDetector", "ServerDetector"]


class Detector(Protocol):
    def detect(self, images: torch.Tensor, metadata: list[dict]) -> list[list[Detection]]: ...


class GivenDetector:
    """Detections from ``metadata[i]["detections"]`` (list of dicts, see the module doc)."""

    def detect(self, images, metadata):
        out = []
        for i, m in enumerate(metadata):
            if m is None or "detections" not in m:
                raise ValueError(f"geneval GivenDetector: metadata[{i}] has no 'detections'")
            out.append([Detection.from_dict(d) for d in m["detections"]])
        return out


class ServerDetector:
    """Client of an external detection server (protocol in the module doc)."""

    def __init__(self, url: str, timeout: float = 120.0):
        if not url or not str(url).startswith(("http://", "https://")):
            raise ValueError(
                f"reward 'geneval': detection server URL must be http(s)://..., got {url!r} "
                "(config key rewards[].args.url or env FASTCPS_GENEVAL_URL)"
            )
        self.url, self.timeout = str(url), float(timeout)

    @staticmethod
    def encode(image: torch.Tensor) -> str:
        buf = io.BytesIO()
        to_pil(image).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def detect(self, images, metadata, prompts=None):
        body = json.dumps(
            {
                "images": [self.encode(im) for im in images],
                "prompts": list(prompts) if prompts is not None else None,
                "metadata": list(metadata),
            }
        ).encode()
        req = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            raise RuntimeError(
                f"geneval detection server {self.url} answered HTTP {err.code}: {detail}"
            ) from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RuntimeError(
                f"geneval detection server {self.url} unreachable or too slow "
                f"(timeout {self.timeout:g} s): {reason}"
            ) from err
        try:
            dets = json.loads(raw)["detections"]
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(
                f"geneval detection server {self.url}: answer is not JSON with a "
                f"'detections' list ({err}): {raw[:200]!r}"
            ) from err
        if not isinstance(dets, list) or len(dets) != len(images):
            n = len(dets) if isinstance(dets, list) else type(dets).__name__
            raise RuntimeError(
                f"geneval detection server {self.url} returned {n} detection lists for {len(images)} images"
            )
        return [[Detection.from_dict(d) for d in per] for per in dets]
