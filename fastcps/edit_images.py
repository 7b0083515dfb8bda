"""The source images of edit rows: where they are, loading them as the anchor does, and the start-up check.

A prompt row with an ``"image"`` (a path or an http(s) URL, or a list of them for several source images)
is an edit row: its prompt is the instruction, its image(s) what to edit (configs/prompts/README.md).
Loading a prompt source (``fastcps.prompts.load_prompts``) resolves each image to an absolute path or a URL
and keeps them, a list with one entry per source image, in the row's metadata under ``SOURCE_IMAGES``:
the images travel with their prompts wherever the prompts go (each rank draws prompts with their metadata).

- A relative path resolves against the prompt file's folder, a named set's against the image root the set
  declares (``fastcps.prompt_sets.image_root``: ``<cache>/images/<family>/``).
- A URL is downloaded once into ``<cache>/edit_images/`` (the file named by the URL's SHA-256) by
  ``python -m fastcps.fetch --config CONFIG``, or by the trainer's start-up check when the hub is not offline.
- ``load_image`` opens, converts and resizes an image as FlowCPS's scripts/train_flux_kontext.py does
  (``Image.open(...).convert("RGB").resize((resolution, resolution))``, PIL's default filter: bicubic for
  RGB) and returns what diffusers' ``VaeImageProcessor.pil_to_numpy`` makes of that picture inside the
  Kontext pipeline: float32 ``[3, H, W]`` in [0, 1]; the pipeline's ``preprocess`` then maps it to [-1, 1]
  (``2 x - 1``) for the VAE, which is the policy's step. (The pipeline's own resize to the same size is a
  copy: PIL returns the image unchanged when the size does not change.)
- ``ImageCache``: decoded images in host memory, least recently used out past a byte budget, keyed by path.
- ``check_edit_images``: every row's images exist and decode, or an error naming the image, its row and
  line, the config key and the fix; the trainer runs it before any model loads (``fastcps.fetch.ensure``).

Nothing heavy is imported at module level: the prompt loaders import this module.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path

SOURCE_IMAGES = "source_images"  # metadata key: the row's resolved source images, a list
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHOWN = 5  # problems listed by name in one error; the rest are counted


class UnreadableImage(FileNotFoundError):
    """An edit image is there but does not decode (truncated, not an image): the run cannot use it. A
    FileNotFoundError, as ``prompt_sets.CorruptDownload``: the trainer reports it and exits 2, as for a
    missing file."""


def is_url(ref: str) -> bool:
    return str(ref).startswith(("http://", "https://"))


def row_images(row: dict, base: Path, where: str) -> list[str] | None:
    """The row's ``"image"`` resolved (URLs as they are, paths absolute against ``base``); None when the row
    has none (a text-to-image row). ValueError naming ``where`` for anything but a string or a non-empty
    list of strings."""
    value = row.get("image")
    if value is None:
        return None
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ValueError(
            f"{where}: 'image' must be a path or URL, or a non-empty list of them (several source images); "
            f"got {value!r}"
        )
    return [r if is_url(r) else os.path.abspath(base / Path(r).expanduser()) for r in refs]


def url_cache_path(url: str) -> Path:
    """Where ``url``'s download is kept: ``<cache>/edit_images/<sha256 of the URL>[.suffix]``."""
    from fastcps.prompt_sets import cache_dir

    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    name = hashlib.sha256(url.encode()).hexdigest()[:32] + (suffix if suffix in IMAGE_SUFFIXES else "")
    return cache_dir() / "edit_images" / name


def local_file(ref: str) -> Path:
    """The file an image reference reads from: the path itself, or a URL's download."""
    return url_cache_path(ref) if is_url(ref) else Path(ref)


def _open_rgb(data):
    """``Image.open(...).convert("RGB")`` (the anchor's two calls), from a path or bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return img.convert("RGB")


def verify(path_or_bytes) -> None:
    """Raise if the image does not decode whole: PIL's ``verify`` (headers, PNG checksums), then a full
    decode, at reduced scale where the format allows it (JPEG's draft mode still reads every coded block, so
    a truncated file fails): counting_edit:train's 310 images (1024 px JPEGs of noise, 0.9 MB each) took
    2.1 s on a loaded 2-core machine."""
    from PIL import Image

    def src():
        return io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes

    with Image.open(src()) as img:
        img.verify()
    with Image.open(src()) as img:
        img.draft("RGB", (64, 64))
        img.load()


def load_image_uint8(ref: str, size: int | tuple[int, int]):
    """One source image opened, converted and resized as the anchor does (see the module doc), as the
    uint8 ``[3, H, W]`` tensor of its pixels. ``size``: the resolution (square, as the anchor's
    ``config.resolution``) or (height, width)."""
    import numpy as np
    import torch

    height, width = (size, size) if isinstance(size, int) else size
    img = _open_rgb(local_file(ref)).resize((width, height))  # PIL's order: (width, height)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def load_image(ref: str, size: int | tuple[int, int]):
    """One source image as the anchor feeds it to the pipeline: float32 ``[3, H, W]`` in [0, 1], what
    ``VaeImageProcessor.pil_to_numpy`` makes of the resized picture (``x / 255``)."""
    return load_image_uint8(ref, size).float().div_(255)


class ImageCache:
    """Source images decoded once and kept in host memory (as uint8, a quarter of float32: a 512 px image
    is 0.75 MiB), least recently used first out past ``max_bytes``; ``get`` returns ``load_image``'s
    float32 ``[3, H, W]`` in [0, 1]. Keyed by the resolved path or URL: rows sharing a source image (the
    counting_edit sets edit each image up to three ways) decode it once."""

    def __init__(self, size: int | tuple[int, int], max_bytes: float = 2**30):
        self.size = size
        self.max_bytes = max_bytes
        self.host: OrderedDict[str, object] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def get(self, ref: str):
        img = self.host.get(ref)
        if img is None:
            self.misses += 1
            img = self.host[ref] = load_image_uint8(ref, self.size)
            self.nbytes += img.nbytes
            while self.nbytes > self.max_bytes and len(self.host) > 1:
                _, old = self.host.popitem(last=False)
                self.nbytes -= old.nbytes
        else:
            self.hits += 1
            self.host.move_to_end(ref)
        return img.float().div_(255)

    def __len__(self) -> int:
        return len(self.host)


def download(url: str, timeout: float = 120.0) -> Path:
    """``url`` into its cache file, checked to decode before it is kept, written atomically (ranks sharing a
    cache each write their own temporary file). FileNotFoundError naming the URL when it fails."""
    path = url_cache_path(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as err:
        raise FileNotFoundError(f"edit image {url}: the server answered HTTP {err.code}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise FileNotFoundError(
            f"edit image {url}: could not download it ({getattr(err, 'reason', err)})"
        ) from err
    try:
        verify(data)
    except Exception as err:
        raise UnreadableImage(f"edit image {url}: the download is not an image PIL can read ({err})") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def edit_refs(source: str, key: str) -> list[tuple[int, int, str]]:
    """(row, line, image) for every source image of every edit row of ``source``, in file order (rows
    count from 1, blank lines not counted)."""
    from fastcps.prompts import load_rows

    _, rows = load_rows(source, key)
    return [
        (i + 1, line, ref) for i, (line, _, meta) in enumerate(rows) for ref in meta.get(SOURCE_IMAGES, ())
    ]


def declares_images(source: str | None) -> bool:
    """Whether ``source`` (a config's prompt source) has edit rows: a named set with an image root, or a
    .jsonl file here with a row naming an image. False when it cannot tell (no such file, a malformed one):
    the prompt loader reports those itself."""
    from fastcps import prompt_sets

    if not source or source == "digits":
        return False
    if prompt_sets.looks_like_name(source):
        return source in prompt_sets.SETS and prompt_sets.SETS[source].images is not None
    if Path(source).suffix != ".jsonl" or not Path(source).is_file():
        return False
    try:
        return bool(edit_refs(source, ""))
    except (ValueError, OSError):
        return False


def where_and_fix(source: str, ref: str, unreadable: bool = False) -> tuple[str, str]:
    """(what ``source`` is, in words; how to get the image ``ref`` in place)."""
    from fastcps import prompt_sets

    if is_url(ref):
        fix = (
            "run `python -m fastcps.fetch --config CONFIG` (it downloads the images of URL rows into "
            f"{url_cache_path(ref).parent}) on every node, or share FASTCPS_CACHE (or HF_HOME) between them"
        )
        if unreadable:
            fix = f"delete the cached copy ({url_cache_path(ref)}) and {fix}"
    elif prompt_sets.looks_like_name(source):
        images = prompt_sets.get(source).images
        root = prompt_sets.image_root(prompt_sets.get(source))
        fix = f"{images}; put them under {root} (the rows' paths are relative to it; a symlink will do)"
    else:
        folder = Path(source).resolve().parent
        fix = f"correct the path in the row, or put the image there (relative paths resolve against {folder})"
        if unreadable:
            fix = "replace the file with a readable image, or correct the path in the row"
    where = f"prompt set {source!r}" if prompt_sets.looks_like_name(source) else f"prompt file {source}"
    return where, fix


Problem = tuple[int, int, str, str]  # (row, line, image, why)


def report(kind: str, found: list[Problem], refs: list[tuple[int, int, str]], source: str, key: str) -> str:
    """The error for ``found`` (images that ``kind``, of all the source's ``refs``): each image once with
    the first row and line naming it (and how many more do), the first few of them, the counts, the config
    key and the fix."""
    where, fix = where_and_fix(source, found[0][2], unreadable=kind == "do not decode")
    by_image: dict[str, list[Problem]] = {}
    for problem in found:
        by_image.setdefault(problem[2], []).append(problem)
    lines = []
    for ref, rows in list(by_image.items())[:SHOWN]:
        row, line, _, why = rows[0]
        also = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
        lines.append(f"    row {row} (line {line}): {ref}{why}{also}")
    if len(by_image) > SHOWN:
        lines.append(f"    ... and {len(by_image) - SHOWN} more images")
    images, rows = len({r for _, _, r in refs}), len({row for row, _, _ in refs})
    return (
        f"{len(by_image)} of the {images} source images of {where} (config key `{key}`), named by "
        f"{len({p[0] for p in found})} of its {rows} edit rows, {kind}:\n"
        + "\n".join(lines)
        + f"\nfix: {fix}"
    )


def missing_images(source: str, key: str) -> tuple[list[Problem], list[tuple[int, int, str]]]:
    """(every (row, image) whose image is not on this machine, all (row, line, image) of the source); no
    decoding."""
    refs = edit_refs(source, key)
    lost = [
        (row, line, ref, " (not downloaded)" if is_url(ref) else "")
        for row, line, ref in refs
        if not local_file(ref).is_file()
    ]
    return lost, refs


def check_edit_images(source: str, key: str = "prompts.source") -> int:
    """Every source image of ``source`` is here and decodes whole (``verify``); returns how many distinct
    images were checked. FileNotFoundError for missing ones, ``UnreadableImage`` (a FileNotFoundError too)
    for ones that do not decode, each naming the images, their rows and lines, the config key and the fix."""
    lost, refs = missing_images(source, key)
    if lost:
        raise FileNotFoundError(report("do not exist", lost, refs, source, key))
    bad, verdict = [], {}
    for row, line, ref in refs:
        if ref not in verdict:  # counting_edit edits each image up to three ways: decode it once
            try:
                verify(local_file(ref))
                verdict[ref] = None
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for a broken file
                verdict[ref] = f" ({type(err).__name__}: {err})"
        if verdict[ref] is not None:
            bad.append((row, line, ref, verdict[ref]))
    if bad:
        raise UnreadableImage(report("do not decode", bad, refs, source, key))
    return len(verdict)


def check_rows_fit_policy(policy_name: str, editing: bool, prompts: list[str], meta: list[dict], key: str):
    """An editing policy needs every row's source image(s), a text-to-image policy none: a ConfigError naming
    ``key``, the first row that does not fit and the fix, before any model loads (a text-to-image model
    would otherwise train on edit instructions with the images silently dropped)."""
    from fastcps.config.errors import ConfigError  # a ValueError: the trainer exits 2 on every rank

    has = [SOURCE_IMAGES in (m or {}) for m in meta]
    if editing and not all(has):
        i = has.index(False)
        raise ConfigError(
            f"{key}: row {i + 1} ({prompts[i]!r}) has no source image, but policy.name = {policy_name!r} "
            'edits images: every row needs one ({"prompt": "<instruction>", "image": "path/or/url.jpg"}, '
            "configs/prompts/README.md), e.g. the counting_edit:train set"
        )
    if not editing and any(has):
        i = has.index(True)
        raise ConfigError(
            f"{key}: row {i + 1} ({prompts[i]!r}) is an edit row (it names a source image), but "
            f"policy.name = "
            f"{policy_name!r} generates from text alone and would ignore the image: use an editing policy "
            '(kontext, qwenimage_edit) or rows without an "image"'
        )
