"""The reward service's request format: one JSON header line, then the images' 8-bit pixels.

``POST /score`` with ``Content-Type: application/x-fastcps-images`` and the body

    {"shape": [B, C, H, W], "dtype": "uint8", "prompts": [B strings], "metadata": [B objects]}\\n<pixels>

``<pixels>``: B*C*H*W bytes, the images' levels ``(x * 255).round()`` in C order (image, channel, row,
column; C = 3 RGB or 1 grey): lossless for the k/255 values every image-model reward scores
(``fastcps.rewards._util.to_uint8``). The header is compact JSON (no raw newline: JSON escapes them
inside strings), so its first ``\\n`` ends it. ``metadata`` may be left out (B empty objects).

Edit rows' source images (optional, since the edit rewards; old clients and servers work as before): a
header key ``"sources": {"shape": [B, 3, H, W], "dtype": "uint8"}`` means B*3*H*W more bytes follow the
images' pixels: each row's source image (``metadata["source_images"][0]``) as the client opened it, resized
to the generated size as the anchor does (``fastcps.edit_images.load_image_uint8``), so that a service on a
machine without the trainer's files scores against it (``image_similarity``). The service hands them to its
reward as ``metadata[i][SOURCE_PIXELS]`` (uint8 numpy [3, H, W]). A client sends them only to a service whose
``/health`` says ``"source_images": true`` (a server without the key would refuse the header key), and
only when every row of the request has a source image.

The answer: ``{"scores": [B numbers]}`` (``null`` for a non-finite score); errors: HTTP 4xx/5xx with
``{"detail": "what is wrong"}``.

Why raw bytes: 8 images of 512x512 cost ~3 ms to frame this way and ~120 ms as base64 in JSON (encode,
dumps, loads, decode; PNG: 130-370 ms) on the 2-core test machine, against a reward's few ms per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

CONTENT_TYPE = "application/x-fastcps-images"
SOURCE_PIXELS = "source_pixels"
"""The metadata key where the service puts a row's received source image (uint8 [3, H, W])."""
FORMAT = (
    'a JSON header line {"shape": [B, C, H, W], "dtype": "uint8", "prompts": [...], "metadata": [...]}, '
    "then B*C*H*W bytes of pixels"
)


class BadRequest(ValueError):
    """A request the service cannot read: answered HTTP ``status`` with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Images:
    """One request's images (uint8 [B, C, H, W], numpy) with their prompts and metadata."""

    pixels: np.ndarray
    prompts: list[str]
    metadata: list[dict]
    sources: np.ndarray | None = None
    """uint8 [B, 3, H, W]: each row's source image, when the client sent them."""

    def metadata_with_sources(self) -> list[dict]:
        """The metadata, each row's with its received source image under ``SOURCE_PIXELS`` (when sent)."""
        if self.sources is None:
            return self.metadata
        return [{**m, SOURCE_PIXELS: s} for m, s in zip(self.metadata, self.sources)]


def encode(
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict] | None = None,
    sources: torch.Tensor | None = None,
) -> bytes:
    """The request body for ``images`` [B, C, H, W] in [0, 1] (their ``to_uint8`` levels); ``sources``:
    the rows' source images, uint8 [B, 3, H', W'] (the module doc)."""
    from fastcps.rewards._util import to_uint8

    pixels = to_uint8(images).cpu().contiguous().numpy()
    meta = [m if m is not None else {} for m in metadata] if metadata is not None else [{}] * len(prompts)
    header = {"shape": list(pixels.shape), "dtype": "uint8", "prompts": list(prompts), "metadata": meta}
    tail = b""
    if sources is not None:
        if sources.dtype != torch.uint8 or sources.ndim != 4 or sources.shape[:2] != (len(prompts), 3):
            raise ValueError(
                f"source images must be uint8 [{len(prompts)}, 3, H, W], got {sources.dtype} "
                f"{list(sources.shape)}"
            )
        src = sources.cpu().contiguous().numpy()
        header["sources"] = {"shape": list(src.shape), "dtype": "uint8"}
        tail = src.tobytes()
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + pixels.tobytes() + tail


def decode(body: bytes) -> Images:
    """The request in ``body``; BadRequest naming what is wrong (and the format) otherwise."""
    end = body.find(b"\n")
    if end < 0:
        raise BadRequest(f"no header line: the body must be {FORMAT}")
    try:
        header = json.loads(body[:end])
    except ValueError as err:
        raise BadRequest(f"the header line is not JSON ({err}); the body must be {FORMAT}") from None
    if not isinstance(header, dict):
        raise BadRequest(f"the header must be a JSON object, got {type(header).__name__}; {FORMAT}")
    unknown = sorted(set(header) - {"shape", "dtype", "prompts", "metadata", "sources"})
    if unknown:
        raise BadRequest(f"unknown header keys {unknown}; the body must be {FORMAT}")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or shape[1] not in (1, 3)
    ):
        raise BadRequest(f"header 'shape' must be [B, C, H, W] with C 1 or 3 and all > 0, got {shape!r}")
    if header.get("dtype") != "uint8":
        raise BadRequest(
            f"header 'dtype' must be \"uint8\" (8-bit levels, round(x * 255)), got {header.get('dtype')!r}"
        )
    n = shape[0]
    prompts = header.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("header 'prompts' must be a list of strings")
    if len(prompts) != n:
        raise BadRequest(f"{n} images (shape {shape}) but {len(prompts)} prompts")
    metadata = header.get("metadata")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    elif not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest("header 'metadata' must be a list of objects (or left out)")
    elif len(metadata) != n:
        raise BadRequest(f"{n} images (shape {shape}) but {len(metadata)} metadata")
    src_shape = _sources_shape(header.get("sources"), n)
    want, src_want = int(np.prod(shape)), int(np.prod(src_shape)) if src_shape else 0
    got = len(body) - end - 1
    if got != want + src_want:
        also = f" and {src_want} of source images ({src_shape})" if src_shape else ""
        raise BadRequest(
            f"shape {shape} needs {want} bytes of uint8 pixels{also} after the header, got {got}"
        )
    # views of the body, no copy: the batcher's concatenation (or the reward's float conversion) copies
    pixels = np.frombuffer(body, dtype=np.uint8, count=want, offset=end + 1).reshape(shape)
    sources = None
    if src_shape:
        sources = np.frombuffer(body, dtype=np.uint8, count=src_want, offset=end + 1 + want).reshape(
            src_shape
        )
    return Images(pixels, prompts, metadata, sources)


def _sources_shape(sources: object, n: int) -> list[int] | None:
    """The optional ``sources`` header's shape [n, 3, H, W]; BadRequest when malformed."""
    if sources is None:
        return None
    shape = sources.get("shape") if isinstance(sources, dict) else None
    if (
        not isinstance(sources, dict)
        or set(sources) != {"shape", "dtype"}
        or sources.get("dtype") != "uint8"
        or not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or shape[:2] != [n, 3]
    ):
        raise BadRequest(
            f'header \'sources\' must be {{"shape": [{n}, 3, H, W], "dtype": "uint8"}} (one source image '
            f"a row), got {sources!r}"
        )
    return shape


def scores_json(scores: list[float]) -> dict:
    """``{"scores": [...]}`` with non-finite scores as null (JSON has no NaN); the client reads them back
    as NaN, and the trainer stops on them naming the prompts (``WeightedReward``)."""
    return {"scores": [s if np.isfinite(s) else None for s in scores]}


def scores_from_json(answer: object, n: int) -> list[float]:
    """The ``n`` scores of an answer; ValueError when it is not ``{"scores": [n numbers or null]}``."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list) or len(scores) != n:
        got = len(scores) if isinstance(scores, list) else repr(answer)[:200]
        raise ValueError(f'answer must be {{"scores": [{n} numbers]}}, got {got}')
    out = []
    for s in scores:
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise ValueError(f"answer's scores must be numbers or null, got {s!r}")
        out.append(float("nan") if s is None else float(s))
    return out
