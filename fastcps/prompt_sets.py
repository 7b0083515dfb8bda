"""Named prompt sets: the train and test prompts the anchors train and evaluate with, by name
(``prompts.source: "pickscore:train"``, ``prompts.eval_source: "pickscore:test"``), checksummed.

Each set is one file of a public repository at a fixed commit, checked against that file's git blob SHA-1
(``git ls-tree <commit> <path>`` upstream: the checksum git itself keeps, so anyone can check it).

- Shipped sets live in ``fastcps/data/prompts/`` (gzip of the upstream bytes, unchanged; flow_grpo's MIT
  licence next to them) and load offline.
- The others (too large to ship) download by URL from ``<base>/<repo>/<commit>/<path>``, base
  ``https://raw.githubusercontent.com`` (env ``FASTCPS_PROMPT_SETS_URL`` replaces it: a mirror, or the
  tests' local server), into ``<cache>/prompts/`` (cache: env ``FASTCPS_CACHE``, else ``$HF_HOME/fastcps``,
  so a shared ``HF_HOME`` shares them too). ``python -m fastcps.fetch`` downloads them; the trainer does
  when one is missing and the hub is not offline (``HF_HUB_OFFLINE=1`` also stops these downloads).
  A download or a cached copy whose checksum differs is refused, naming the file and both checksums.

GenEval files hold one GenEval row a line (``{"tag", "include", "exclude"?, "prompt"}``, as flow_grpo's
``GenevalPromptDataset`` reads them); they load as the prompt plus the row as its metadata, the format of
fastcps's ``.jsonl`` files (configs/prompts/README.md).

Edit sets (``images`` set: counting_edit) are GenEval rows with an ``"image"`` to edit, a path relative to
the set's image root, ``<cache>/images/<family>/`` (``image_root``); ``images`` says where the images come
from. Their source images are not checksummed here: FlowCPS does not publish them (its
dataset/counting_edit/process_data.py generates them with FLUX.1-dev, unseeded), so every copy differs;
``python -m fastcps.edit_sources`` makes them the same way, seeded.

This module imports nothing heavy: the config validator reads ``SETS``.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "prompts"
DEFAULT_URL = "https://raw.githubusercontent.com"
URL_ENV = "FASTCPS_PROMPT_SETS_URL"
CACHE_ENV = "FASTCPS_CACHE"

FLOW_GRPO = ("yifan123/flow_grpo", "ac4c86e8cae021841f1fde853d340e0db67690dd")
DANCE_GRPO = ("XueZeyue/DanceGRPO", "15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344")
FLOW_CPS = ("IamCreateAI/FlowCPS", "b402c7a3d5b2539e6c42fed6c6c042bab9a1be05")


@dataclass(frozen=True)
class PromptSet:
    name: str
    repo: str  # GitHub owner/name
    commit: str
    path: str  # in the repository
    blob_sha1: str  # git's checksum of the file at that commit
    licence: str
    origin: str  # where the prompts come from, in words
    count: int | None = None  # prompts; None: not known before the first download
    shipped: str | None = None  # file name in fastcps/data/prompts (gzip), None = downloaded
    sha256: str | None = None  # of the uncompressed file, for people checking by hand
    geneval: bool = False  # one GenEval metadata row a line
    images: str | None = None  # an edit set: where its source images come from, in words (the fix)

    @property
    def url_path(self) -> str:
        return f"{self.repo}/{self.commit}/{self.path}"


COUNTING_EDIT_IMAGES = (
    "counting_edit's source images are not published: make them with `python -m fastcps.edit_sources "
    "--source counting_edit:train` (FLUX.1-dev from each row's t2i_prompt at 1024 px, 50 steps, guidance "
    "3.5, as FlowCPS's dataset/counting_edit/process_data.py makes them, but seeded per image; "
    "`torchrun --nproc-per-node 8 -m fastcps.edit_sources ...` splits them over GPUs; the test set's "
    "images are among the train set's), or use copies you have"
)


def _flow_grpo(name, path, blob, **kw) -> PromptSet:
    return PromptSet(name, *FLOW_GRPO, path, blob, licence="MIT (flow_grpo, (c) 2025 Jie Liu)", **kw)


SETS: dict[str, PromptSet] = {
    s.name: s
    for s in (
        _flow_grpo(
            "pickscore:train",
            "dataset/pickscore/train.txt",
            "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
            origin="Pick-a-Pic prompts as flow_grpo splits them (its PickScore recipes train on these)",
            count=25432,
            shipped="pickscore_train.txt.gz",
            sha256="2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f",
        ),
        _flow_grpo(
            "pickscore:test",
            "dataset/pickscore/test.txt",
            "45f05231b969fb5f74c8debd606b22cd3be27f8e",
            origin="Pick-a-Pic prompts, flow_grpo's held-out split (its PickScore evaluation)",
            count=2048,
            shipped="pickscore_test.txt.gz",
            sha256="d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262",
        ),
        _flow_grpo(
            "ocr:train",
            "dataset/ocr/train.txt",
            "3ce0521b77b0a9031191d66ecc36ebaaf27a3922",
            origin='flow_grpo\'s text-rendering prompts (the text to draw in "double quotes")',
        ),
        _flow_grpo(
            "ocr:test",
            "dataset/ocr/test.txt",
            "8deb4f8d8f2e863f45353354243669b3c991a6a2",
            origin="flow_grpo's held-out text-rendering prompts",
            count=1018,
            shipped="ocr_test.txt.gz",
            sha256="4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc",
        ),
        _flow_grpo(
            "geneval:train",
            "dataset/geneval/train_metadata.jsonl",
            "0b97e8a6802c08fc7537cd00c76ae79c851bddcb",
            origin="GenEval-style compositional prompts with their rules, flow_grpo's training set",
            geneval=True,
        ),
        _flow_grpo(
            "geneval:test",
            "dataset/geneval/test_metadata.jsonl",
            "27cdaf5cc1356fe15aeadbb8df55682ca74228f0",
            origin="GenEval's 553 prompts, each 4 times (flow_grpo's evaluation; fastcps's eval set keeps "
            "one of each)",
            count=2212,
            shipped="geneval_test_metadata.jsonl.gz",
            sha256="cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28",
            geneval=True,
        ),
        *(
            PromptSet(
                f"counting_edit:{split}",
                *FLOW_CPS,
                f"dataset/counting_edit/{split}_metadata.jsonl",
                blob,
                licence="MIT (FlowCPS, (c) 2025 Jie Liu)",
                origin=f"FlowCPS's object-counting edit instructions ({split} split, its FLUX.1 Kontext "
                "recipe): each asks to change how many of an object a FLUX.1-dev image shows",
                count=count,
                shipped=f"counting_edit_{split}_metadata.jsonl.gz",
                sha256=sha256,
                geneval=True,
                images=COUNTING_EDIT_IMAGES,
            )
            for split, blob, count, sha256 in (
                (
                    "train",
                    "98b1491b63dd0f299ccfd961c6a8236d35f43fb1",
                    818,
                    "64fa1ee657f4292d37bf494326a0f35404dbb217b2a319fb15b4abd715bcb349",
                ),
                (
                    "test",
                    "bf5c44d94dbac2b0435f125c48bc8538a98631ee",
                    112,
                    "3d38b10151b74e23e06393be908b52e50f816215915c2f904ef4ff7af97fcd50",
                ),
            )
        ),
        PromptSet(
            "hpd:train",
            *DANCE_GRPO,
            "assets/prompts.txt",
            "b47234e475645222ca9a0bb7742ebf4d08123855",
            licence="Apache-2.0 (DanceGRPO)",
            origin="HPDv2 prompts, the set DanceGRPO trains its FLUX HPSv2 runs on",
        ),
    )
}

_NAME = re.compile(r"^[a-z0-9_]+:[a-z0-9_]+$")


class CorruptDownload(FileNotFoundError):
    """A prompt set's file is there but its checksum is not the expected one: the run cannot use it
    (a FileNotFoundError: the trainer reports it and exits 2, as for a missing file)."""


def looks_like_name(source: str) -> bool:
    """``family:split`` (no path separator, no suffix) that is not an existing file."""
    return bool(_NAME.match(str(source))) and not Path(source).exists()


def unknown_set_message(name: str, key: str | None = "prompts.source") -> str:
    close = difflib.get_close_matches(name, list(SETS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    where = f" (config key `{key}`)" if key else ""
    return (
        f"unknown prompt set {name!r}{where}{hint} Named sets: {', '.join(SETS)}; "
        "or give a .txt / .jsonl file, or `digits` for the toy"
    )


def get(name: str, key: str = "prompts.source") -> PromptSet:
    if name not in SETS:
        raise ValueError(unknown_set_message(name, key))
    return SETS[name]


def git_blob_sha1(data: bytes) -> str:
    """The SHA-1 git gives a file's content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_dir() -> Path:
    """``$FASTCPS_CACHE``, else ``$HF_HOME/fastcps`` (HF_HOME as huggingface_hub resolves it), read now."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_HOME", default)).expanduser() / "fastcps"


def local_path(s: PromptSet) -> Path:
    """Where the set's file is (shipped) or goes (downloaded)."""
    if s.shipped:
        return DATA / s.shipped
    stem = s.name.replace(":", "_")
    return cache_dir() / "prompts" / f"{stem}.{s.blob_sha1[:12]}{Path(s.path).suffix}"


def image_root(s: PromptSet) -> Path:
    """The folder an edit set's relative image paths resolve against: ``<cache>/images/<family>/`` (a
    symlink to the folder that holds them will do)."""
    return cache_dir() / "images" / s.name.split(":")[0]


def url(s: PromptSet) -> str:
    return f"{os.environ.get(URL_ENV, DEFAULT_URL).rstrip('/')}/{s.url_path}"


def _check(s: PromptSet, data: bytes, where: str) -> bytes:
    got = git_blob_sha1(data)
    if got != s.blob_sha1:
        raise CorruptDownload(
            f"prompt set {s.name!r}: {where} has git blob SHA-1 {got}, expected {s.blob_sha1} "
            f"({s.repo} {s.path} at {s.commit[:12]}); `python -m fastcps.fetch --prompt-set {s.name}` (or "
            "`--config CONFIG`) downloads it again and replaces it"
        )
    return data


def read_bytes(s: PromptSet) -> bytes:
    """The set's verified bytes; FileNotFoundError (a not yet downloaded set) or CorruptDownload."""
    path = local_path(s)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt set {s.name!r} is not downloaded on this machine (expected at {path}): run "
            f"`python -m fastcps.fetch --config CONFIG` (or `--prompt-set {s.name}`) on every node, or share "
            "HF_HOME (or FASTCPS_CACHE) between them"
        )
    raw = path.read_bytes()
    return _check(s, gzip.decompress(raw) if path.suffix == ".gz" else raw, str(path))


def is_available(s: PromptSet) -> bool:
    """The file is there and its checksum is right (no network)."""
    try:
        read_bytes(s)
    except FileNotFoundError:  # CorruptDownload included
        return False
    return True


def download(s: PromptSet, timeout: float = 120.0) -> Path:
    """Download ``s`` (a non-shipped set) into the cache, verified, atomically; returns its path."""
    path = local_path(s)
    if s.shipped:
        return path
    src = url(s)
    try:
        with urllib.request.urlopen(src, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as err:
        raise FileNotFoundError(f"prompt set {s.name!r}: {src} answered HTTP {err.code}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise FileNotFoundError(
            f"prompt set {s.name!r}: could not download {src} ({getattr(err, 'reason', err)})"
        ) from err
    _check(s, data, f"the download from {src}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks sharing a cache each write their own
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    return path


def load(name: str, key: str = "prompts.source") -> tuple[list[str], list[dict]]:
    """(prompts, metadata) of named set ``name``: a .txt set gives ``{}`` metadata, a GenEval set the row
    (an edit set's with its resolved source images, ``fastcps.edit_images.SOURCE_IMAGES``)."""
    rows = load_rows(name, key)
    return [p for _, p, _ in rows], [m for _, _, m in rows]


def load_rows(name: str, key: str = "prompts.source") -> list[tuple[int, str, dict]]:
    """(line, prompt, metadata) of each row of named set ``name``."""
    s = get(name, key)
    text = read_bytes(s).decode("utf-8")
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not s.geneval:
        return [(n, line, {}) for n, line in lines]
    rows = [(n, json.loads(line)) for n, line in lines]
    if s.images is not None:
        from fastcps.edit_images import SOURCE_IMAGES, row_images

        root = image_root(s)
        for n, r in rows:
            images = row_images(r, root, f"prompt set {name!r}, line {n}")
            if images is not None:
                r[SOURCE_IMAGES] = images
    return [(n, str(r["prompt"]), r) for n, r in rows]
