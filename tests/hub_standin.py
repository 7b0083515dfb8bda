"""A Hugging Face hub in memory for the fetch tests: repos as {path: bytes}, answering the two
huggingface_hub calls fastcps.fetch makes (``HfApi.repo_info(files_metadata=True)``, ``snapshot_download``)
and writing what it downloads into the hub cache's layout (refs/<revision>, snapshots/<commit>/...), which
transformers and diffusers then read offline."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace


ROOT = Path(__file__).resolve().parent.parent


def cfg_of(name, sets=()):
    """configs/<name>.json with ``sets`` applied."""
    from fastcps.config import RunConfig, load_config

    return load_config(RunConfig, str(ROOT / "configs" / f"{name}.json"), list(sets))


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` as {prefix + relative path: bytes}."""
    return {
        prefix + str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class StandinHub:
    def __init__(self, repos: dict[str, dict[str, bytes] | Exception]):
        self.repos = repos
        self.listed: list[str] = []
        self.downloads: list[tuple[str, list[str]]] = []

    @staticmethod
    def commit(files: dict[str, bytes]) -> str:
        h = hashlib.sha1()
        for path in sorted(files):
            h.update(path.encode() + hashlib.sha1(files[path]).digest())
        return h.hexdigest()

    def _repo(self, repo_id: str) -> dict[str, bytes]:
        repo = self.repos[repo_id]
        if isinstance(repo, Exception):
            raise repo
        return repo

    def install(self, monkeypatch) -> StandinHub:
        import huggingface_hub

        hub = self

        def repo_info(api, repo_id, repo_type=None, revision=None, files_metadata=False, **kw):
            hub.listed.append(repo_id)
            files = hub._repo(repo_id)
            siblings = [
                SimpleNamespace(rfilename=p, size=len(b) if files_metadata else None)
                for p, b in files.items()
            ]
            return SimpleNamespace(sha=hub.commit(files), siblings=siblings)

        def snapshot_download(
            repo_id, *, repo_type=None, revision=None, allow_patterns=None, cache_dir=None, **kw
        ):
            files = hub._repo(repo_id)
            chosen = [
                p
                for p in files
                if allow_patterns is None or any(fnmatch.fnmatch(p, a) for a in allow_patterns)
            ]
            hub.downloads.append((repo_id, sorted(chosen)))
            kind = repo_type or "model"
            root = Path(cache_dir) / f"{kind}s--{repo_id.replace('/', '--')}"
            commit = hub.commit(files)
            (root / "refs").mkdir(parents=True, exist_ok=True)
            (root / "refs" / (revision or "main")).write_text(commit)
            snap = root / "snapshots" / commit
            for p in chosen:
                (snap / p).parent.mkdir(parents=True, exist_ok=True)
                (snap / p).write_bytes(files[p])
            snap.mkdir(parents=True, exist_ok=True)
            return str(snap)

        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return self


def tiny_repos(root: Path):
    """Tiny stand-ins of FLUX.1-dev, SD3.5-Medium, PickScore (+ its processor repo) and HPSv2 as hub repos,
    each with files the loaders must not need (root checkpoints, other weight formats), built in ``root``;
    returns (repos, the tiny HPS model config's path)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from tiny_rewards import TINY_OPEN_CLIP, _tiny_hf_clip, tiny_hps_checkpoint
    from transformers import T5EncoderModel

    from fastcps.testing import save_tiny_flux, save_tiny_sd3

    flux = save_tiny_flux(root / "flux")
    for sub, cls in (("transformer", FluxTransformer2DModel), ("text_encoder_2", T5EncoderModel)):
        model = cls.from_pretrained(flux / sub)  # sharded, as FLUX.1-dev's are: an index and its shards
        shutil.rmtree(flux / sub)
        model.save_pretrained(flux / sub, max_shard_size="100KB")
    assert len(list((flux / "transformer").glob("*.safetensors"))) > 1
    sd3 = save_tiny_sd3(root / "sd3")
    _tiny_hf_clip(root / "clip")
    hps, hps_cfg = tiny_hps_checkpoint(root)
    extras = {"README.md": b"#", "flux1-dev.safetensors": b"\0" * 4096, "ae.safetensors": b"\0" * 512}
    repos = {
        "black-forest-labs/FLUX.1-dev": {**folder_files(flux), **extras},
        "stabilityai/stable-diffusion-3.5-medium": {
            **folder_files(sd3),
            "sd3.5_medium.safetensors": b"\0" * 4096,
        },
        "yuvalkirstain/PickScore_v1": {
            **folder_files(root / "clip" / "model"),
            "pytorch_model.bin": b"\0" * 999,
        },
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {  # the real one holds the CLIP config and weights too
            **folder_files(root / "clip" / "processor"),
            "config.json": (root / "clip" / "model" / "config.json").read_bytes(),
            "open_clip_pytorch_model.bin": b"\0" * 2048,
            "model.safetensors": b"\0" * 2048,
        },
        "xswu/HPSv2": {"HPS_v2.1_compressed.pt": hps.read_bytes(), "HPS_v2_compressed.pt": b"\0" * 1000},
    }
    assert json.loads(hps_cfg.read_text()) == TINY_OPEN_CLIP
    torch.manual_seed(0)
    return repos, hps_cfg


def empty_hf_home(tmp_path: Path, monkeypatch) -> Path:
    """HF_HOME in ``tmp_path``, nothing else of the caller's cache settings."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "FASTCPS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return home
