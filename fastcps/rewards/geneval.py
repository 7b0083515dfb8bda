"""``geneval``: GenEval's rule-based scoring (Ghosh et al. 2023) from object detections.

Per prompt, the metadata follows GenEval's ``evaluation_metadata.jsonl``::

    {"tag": "counting" | "single_object" | "two_object" | "colors" | "position" | "color_attr",
     "include": [{"class": "dog", "count": 2, "color"?: "red", "position"?: ["left of", 0]}, ...],
     "exclude": [{"class": "dog", "count": 3}, ...]}

Rules (as GenEval's ``evaluate_images.py``): detections of each class are kept when their score is
above ``threshold`` (0.3; ``counting_threshold`` 0.9 for ``tag == "counting"``), highest first, at most
``max_objects`` (16) per class, with optional per-class NMS (``nms_threshold`` 1.0 = off, GenEval's default).
Each ``include`` needs ``count`` objects of its class (the highest-scored ``count`` are checked); with
``color`` all of them must have that colour; with ``position: [relation, j]`` each of them must stand in
``relation`` ("left of", "right of", "above", "below") to every object matched by include ``j`` — on box
centres, after shrinking the offset by ``position_threshold`` (0.1) × the summed box sizes, and a direction
counts when its component of the unit offset exceeds 0.5. Each ``exclude`` fails when ``count`` or more
objects of its class are found.

Score (``args.score``): ``"strict"`` (default) = 1 if every rule passes else 0, GenEval's metric;
``"partial"`` = the fraction of rules (each include and each exclude entry is one rule) that pass, a
denser training signal.

Detection sits behind ``Detector.detect(images [B,3,H,W] in [0,1], metadata) -> list[list[Detection]]``:

- ``ServerDetector(url)`` (``args.detector: "server"``, the default, ``args.url`` or env
  ``FASTCPS_GENEVAL_URL``): an external detection server, e.g. GenEval's Mask2Former + CLIP colour
  classifier behind HTTP. Protocol: ``POST url`` with ``Content-Type: application/json`` and body
  ``{"images": [<base64 PNG>, ...], "prompts": [...], "metadata": [...]}``; the answer is
  ``{"detections": [[{"label": str, "box": [x1, y1, x2, y2], "score": float, "color"?: str}, ...], ...]}``
  with one list per image (boxes in pixels; colours from GenEval's list, needed for colour rules).
  ``timeout`` (s, 120) per request; errors name the URL and the HTTP status or the malformed field.
  The PNG holds the images' 8-bit levels, ``(images * 255).round()``, losslessly: what GenEval's own
  evaluator reads (it scores saved PNG files). flow_grpo's ``geneval_score`` sends the same levels as
  JPEG at PIL's default quality 75 (lossy) to its server.
- ``GivenDetector`` (``args.detector: "given"``): reads ``metadata[i]["detections"]`` in the same
  format; for tests and for detections computed elsewhere.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from fastcps.rewards import RewardArgs
from fastcps.rewards._util import check_inputs, to_pil

__all__ = [
    "COLORS",
    "Detection",
    "Detector",
    "GenEvalReward",
    "GivenDetector",
    "ServerDetector",
    "evaluate",
    "filter_detections",
    "relative_position",
]

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (pixels; y grows downwards)
    score: float = 1.0
    color: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Detection:
        try:
            box = tuple(float(v) for v in d["box"])
            if len(box) != 4:
                raise ValueError(f"box needs 4 numbers, got {len(box)}")
            return cls(str(d["label"]), box, float(d.get("score", 1.0)), d.get("color"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"geneval: bad detection {d!r} ({err}); expected "
                "{'label', 'box': [x1, y1, x2, y2], 'score', 'color'?}"
            ) from err


class Detector(Protocol):
    def detect(self, images: torch.Tensor, metadata: list[dict]) -> list[list[Detection]]: ...


class GivenDetector:
    """Detections from ``metadata[i]["detections"]`` (list of dicts, see module doc)."""

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


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def filter_detections(
    dets: list[Detection], threshold: float, max_objects: int = 16, nms_threshold: float = 1.0
) -> dict[str, list[Detection]]:
    """Class -> kept detections, highest score first (GenEval's selection)."""
    by_class: dict[str, list[Detection]] = {}
    for d in dets:
        by_class.setdefault(d.label, []).append(d)
    out = {}
    for cls, ds in by_class.items():
        order = sorted((d for d in ds if d.score > threshold), key=lambda d: -d.score)[:max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if nms_threshold < 1:
                order = [d for d in order if _iou(best.box, d.box) < nms_threshold]
        if kept:
            out[cls] = kept
    return out


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"), GenEval's rule."""
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    dim_a = (abs(a.box[2] - a.box[0]), abs(a.box[3] - a.box[1]))
    dim_b = (abs(b.box[2] - b.box[0]), abs(b.box[3] - b.box[1]))
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = [
        max(abs(o) - position_threshold * (da + db), 0.0) * math.copysign(1.0, o) if o != 0 else 0.0
        for o, da, db in zip(off, dim_a, dim_b)
    ]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate(
    objects: dict[str, list[Detection]], metadata: dict, position_threshold: float = 0.1
) -> tuple[bool, int, int, list[str]]:
    """GenEval's ``evaluate``: (all rules pass, rules passed, rules, reasons) for kept detections."""
    reasons: list[str] = []
    passed = total = 0
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        total += 1
        cls, count = req["class"], int(req["count"])
        found = objects.get(cls, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if any(c is None for c in colors):
                    raise ValueError(
                        f"geneval: prompt needs a {req['color']} {cls} but the detector gives "
                        "no colours (the detection server must return 'color')"
                    )
                if colors.count(req["color"]) < count:
                    ok = False
                    reasons.append(
                        f"expected {req['color']} {cls}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}"
                    )
            if "position" in req and ok:
                rel, target = req["position"][0], int(req["position"][1])
                if rel not in RELATIONS:
                    raise ValueError(f"geneval: unknown relation {rel!r}; one of {RELATIONS}")
                group = matched_groups[target] if target < len(matched_groups) else None
                if group is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in group:
                            true_rels = relative_position(obj, tgt, position_threshold)
                            if rel not in true_rels:
                                ok = False
                                reasons.append(
                                    f"expected {cls} {rel} target, found "
                                    f"{' and '.join(sorted(true_rels)) or 'no relation to'} target"
                                )
                                break
                        if not ok:
                            break
        matched_groups.append(found if ok else None)
        passed += ok
    for req in metadata.get("exclude", []):
        total += 1
        cls, count = req["class"], int(req["count"])
        if len(objects.get(cls, [])) >= count:
            reasons.append(f"expected {cls}<{count}, found {len(objects[cls])}")
        else:
            passed += 1
    return passed == total, passed, total, reasons


class GenEvalReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` in [0, 1] (fp32).

    Args (config ``rewards[].args``): ``detector`` ("server" | "given", or a Detector object),
    ``url`` (server; default env FASTCPS_GENEVAL_URL), ``timeout`` (s, 120), ``score`` ("strict" |
    "partial"), ``threshold`` (0.3), ``counting_threshold`` (0.9), ``max_objects`` (16),
    ``nms_threshold`` (1.0 = off), ``position_threshold`` (0.1).
    ``last_reasons`` keeps the failure reasons of the last batch, one list per image.
    """

    name = "geneval"

    class Args(RewardArgs):
        detector: Literal["server", "given"] = "server"
        """`server` (the detection server at `url`) or `given` (detections in the prompts' metadata)."""
        url: str | None = None
        """Detection server; None = env FASTCPS_GENEVAL_URL."""
        timeout: float = 120.0
        """Seconds per server request."""
        score: Literal["strict", "partial"] = "strict"
        """`strict`: 1 when every rule passes, else 0; `partial`: the fraction of rules that pass."""
        threshold: float = 0.3
        """Detections above this score count."""
        counting_threshold: float = 0.9
        """`threshold` of prompts tagged `counting`."""
        max_objects: int = 16
        """Detections kept per class, highest score first."""
        nms_threshold: float = 1.0
        """IoU of non-maximum suppression; 1.0 = off."""
        position_threshold: float = 0.1
        """Offset shrink (x the summed box sizes) of the relative-position checks."""

    def __init__(
        self,
        detector="server",
        url: str | None = None,
        timeout: float = 120.0,
        score: str = "strict",
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        nms_threshold: float = 1.0,
        position_threshold: float = 0.1,
    ):
        if score not in ("strict", "partial"):
            raise ValueError(
                f"reward 'geneval': config key rewards[].args.score must be 'strict' or "
                f"'partial', got {score!r}"
            )
        if detector not in ("server", "given") and not hasattr(detector, "detect"):
            raise ValueError(
                f"reward 'geneval': config key rewards[].args.detector must be 'server' or "
                f"'given', got {detector!r}"
            )
        self.detector_spec, self.url, self.timeout = detector, url, float(timeout)
        self.score, self.threshold, self.counting_threshold = (
            score,
            float(threshold),
            float(counting_threshold),
        )
        self.max_objects, self.nms_threshold = int(max_objects), float(nms_threshold)
        self.position_threshold = float(position_threshold)
        self._detector = None
        self.last_reasons: list[list[str]] = []

    @classmethod
    def files(cls, args: dict) -> list:
        """Nothing: detection runs on the server at ``url`` (or the detections come in the metadata)."""
        return []

    def load(self, device=None) -> None:
        """Set up the detector now: a missing server URL fails at start-up, not at the first reward."""
        self.detector  # noqa: B018  (the property builds it)

    @property
    def detector(self):
        if self._detector is None:
            spec = self.detector_spec
            if spec == "given":
                self._detector = GivenDetector()
            elif spec == "server":
                url = self.url or os.environ.get("FASTCPS_GENEVAL_URL")
                if not url:
                    raise ValueError(
                        "reward 'geneval': no detection server; set config key "
                        "rewards[].args.url (or env FASTCPS_GENEVAL_URL), or "
                        "rewards[].args.detector: given with metadata['detections']"
                    )
                self._detector = ServerDetector(url, self.timeout)
            else:
                self._detector = spec
        return self._detector

    def score_detections(self, detections: list[Detection], meta: dict) -> tuple[float, list[str]]:
        thr = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
        objects = filter_detections(detections, thr, self.max_objects, self.nms_threshold)
        ok, passed, total, reasons = evaluate(objects, meta, self.position_threshold)
        if self.score == "strict":
            return float(ok), reasons
        return (passed / total if total else 1.0), reasons

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        check_inputs(self.name, images, prompts, metadata)
        if metadata is None or any(not m or ("include" not in m and "exclude" not in m) for m in metadata):
            raise ValueError(
                "reward 'geneval' needs GenEval metadata per prompt ({'tag', 'include', "
                "'exclude'}); use a .jsonl prompt file with a 'metadata' field"
            )
        det = self.detector
        if isinstance(det, ServerDetector):
            dets = det.detect(images, metadata, prompts)
        else:
            dets = det.detect(images, metadata)
        if len(dets) != images.shape[0]:
            raise RuntimeError(
                f"reward 'geneval': detector returned {len(dets)} lists for {images.shape[0]} images"
            )
        scores, self.last_reasons = [], []
        for d, m in zip(dets, metadata):
            s, why = self.score_detections(d, m)
            scores.append(s)
            self.last_reasons.append(why)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
