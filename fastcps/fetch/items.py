"""What a config needs, as data: hub repos (with the files of each), local paths, named prompt sets, and
models a library downloads itself. Policies and rewards declare theirs next to their arguments
(``DiffusersPolicy.files(cfg)``, ``Reward.files(args)``); nothing here imports torch or the hub."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

#: files of a weight format; a folder keeps one format (``hub.select``)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")


@dataclass(frozen=True)
class HubRepo:
    """Files of one Hugging Face hub repo. ``allow_patterns`` select them (fnmatch, as snapshot_download);
    in each folder only one weight format is kept (safetensors when there are any, as transformers and
    diffusers load them). ``required``: files the loader opens (checked in the local cache, no network);
    ``weights``: folders ("" = the root) that must hold a complete weight set (every shard of an index).
    A required entry ``a|b`` is satisfied by either file."""

    repo_id: str
    key: str  # the config key that names it, e.g. "policy.pretrained", "rewards.0.args.model"
    what: str
    allow_patterns: tuple[str, ...] = ("*",)
    required: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    repo_type: str = "model"
    revision: str = "main"

    @property
    def label(self) -> str:
        return self.repo_id if self.repo_type == "model" else f"{self.repo_type} {self.repo_id}"


@dataclass(frozen=True)
class LocalPath:
    """A file or folder the config names on this machine: nothing to download, it must exist."""

    path: str
    key: str
    what: str

    @property
    def label(self) -> str:
        return self.path or "(not set)"


@dataclass(frozen=True)
class PromptSetFile:
    """A named prompt set (``fastcps.prompt_sets``): shipped, or downloaded by URL and checksummed."""

    name: str
    key: str
    what: str = "prompt set"

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class EditImages:
    """The source images of a prompt source's edit rows (``fastcps.edit_images``): local files that must
    exist and decode, and URLs downloaded into fastcps's cache."""

    source: str  # the prompt source: a .jsonl file or a named edit set
    key: str
    what: str = "edit source images"

    @property
    def label(self) -> str:
        return self.source


@dataclass(frozen=True)
class EngineModels:
    """Models a library downloads itself, to its own cache, on first use (PaddleOCR): fetched by building
    the engine once; their size is not known in advance."""

    what: str
    key: str
    where: str  # the library's cache, in words
    build: Callable[[], object] = dataclasses.field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.where


Item = HubRepo | LocalPath | PromptSetFile | EditImages | EngineModels


def with_key_prefix(items: list[Item], prefix: str) -> list[Item]:
    """``rewards.0.args.`` + each item's key (a reward declares its files by argument name)."""
    return [dataclasses.replace(it, key=prefix + it.key) for it in items]


def transformers_model(repo_id: str, key: str, what: str, *extra_required: str) -> HubRepo:
    """A transformers model repo (``CLIPModel.from_pretrained``): configs, tokenizer files, one weight
    format."""
    return HubRepo(
        repo_id,
        key,
        what,
        allow_patterns=("*.json", "*.txt", "*.model", "*.safetensors", "*.bin"),
        required=("config.json", *extra_required),
        weights=("",),
    )


def transformers_processor(repo_id: str, key: str, what: str, *required: str) -> HubRepo:
    """A processor only (image processor, tokenizer): the repo's configs and vocabularies, no weights."""
    return HubRepo(repo_id, key, what, allow_patterns=("*.json", "*.txt", "*.model"), required=required)


#: an image processor's settings: their own file, or inside transformers 5's processor_config.json
IMAGE_PROCESSOR = "preprocessor_config.json|processor_config.json"


def hub_file(repo_id: str, filename: str, key: str, what: str) -> HubRepo:
    return HubRepo(repo_id, key, what, allow_patterns=(filename,), required=(filename,))


def local_or_hub(value, key: str, what: str, hub: Callable[[str, str, str], HubRepo]) -> Item:
    """``value`` as the rewards read it (``fastcps.rewards._util.is_local_path``): a local path, or a hub
    id whose files ``hub(value, key, what)`` declares (``transformers_model``, ...)."""
    from fastcps.rewards._util import is_local_path

    if value is None or str(value) == "" or is_local_path(str(value)):
        return LocalPath("" if value is None else str(value), key, what)
    return hub(str(value), key, what)
