"""Test-only helpers for the checkpoint tests (tests/test_checkpoints.py): a recorder of the files each
checkpoint save writes that can stop a save where a kill would (tests/multi_run.py ``--writes`` /
``--fault``), and the tiny toy weights those runs train."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class InjectedFault(RuntimeError):
    """Raised by ``CheckpointWrites`` where a kill would have stopped the run."""


def _checkpoint_relpath(path) -> str | None:
    """``path`` relative to the ``checkpoints`` folder it lies under (``"epoch00001/ema_rank0.pt"``,
    ``"latest"``), or None when it lies under none."""
    parts = Path(str(path)).parts
    if "checkpoints" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("checkpoints")
    return "/".join(parts[at + 1 :]) or None


class CheckpointWrites:
    """Records every file written under a run's ``checkpoints/`` folder, in order, by the four writers a
    checkpoint save uses: ``torch.save`` (DeepSpeed's states, each rank's EMA), safetensors'
    ``save_file`` (the exported weights), DeepSpeed's own ``open(..., "w")`` (its ``latest``) and
    fastcps's atomic text writer (``fastcps.checkpoint.files.write_atomic``: the marker, ``latest``,
    the export's index and config), where it exists. Files are grouped into saves by the folder they
    land in (``final.partial/x`` belongs to the save of ``final``; ``latest`` to the save in progress).

    ``faults``: run index -> (save s, file j), 1-based: in that run, right after the j-th file of the
    s-th save is written, ``InjectedFault`` is raised from the writer, as a kill (SIGKILL, a lost node)
    leaves the checkpoint folder. ``save()`` writes ``<folder>/run<k>.rank<r>.json``: the saves, each
    a list of its files."""

    def __init__(self, folder: Path, faults: dict[int, tuple[int, int]] | None = None):
        import builtins

        import deepspeed.runtime.engine as ds_engine
        import safetensors.torch

        self.folder, self.faults, self.run = Path(folder), dict(faults or {}), 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.saves: list[list[str]] = []
        self.tag: str | None = None
        real_save, real_save_file = torch.save, safetensors.torch.save_file

        def torch_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            self.written(f)

        def save_file(tensors, filename, *args, **kwargs):
            real_save_file(tensors, filename, *args, **kwargs)
            self.written(filename)

        def ds_open(file, mode="r", *args, **kwargs):
            handle = builtins.open(file, mode, *args, **kwargs)
            if "w" not in mode or _checkpoint_relpath(file) is None:
                return handle
            recorder = self

            class Closing:  # the file counts as written once it is closed
                def __enter__(self):
                    return handle.__enter__()

                def __exit__(self, *exc):
                    out = handle.__exit__(*exc)
                    recorder.written(file)
                    return out

            return Closing()

        torch.save, safetensors.torch.save_file, ds_engine.open = torch_save, save_file, ds_open
        try:
            import fastcps.checkpoint.files as files
        except ImportError:  # the checkpoint code before its marker and atomic writer
            return
        real_atomic = files.write_atomic

        def write_atomic(path, text):
            real_atomic(path, text)
            self.written(path)

        files.write_atomic = write_atomic

    def written(self, path) -> None:
        rel = _checkpoint_relpath(path)
        if rel is None:
            return
        if "/" in rel:  # <tag>[.suffix]/...: a new save when the tag changes
            tag = rel.split("/", 1)[0].split(".", 1)[0]
            if tag != self.tag:
                self.tag = tag
                self.saves.append([])
        if not self.saves:
            self.saves.append([])
        self.saves[-1].append(rel)
        fault = self.faults.get(self.run)
        if fault == (len(self.saves), len(self.saves[-1])):
            raise InjectedFault(
                f"injected fault after writing checkpoints/{rel} (save {fault[0]}, file {fault[1]})"
            )

    def start(self, run: int) -> None:
        self.run, self.saves, self.tag = run, [], None

    def save(self) -> None:
        import json

        rank = int(os.environ.get("RANK", "0"))
        (self.folder / f"run{self.run}.rank{rank}.json").write_text(json.dumps(self.saves, indent=1))


TINY_TOY = ROOT / "tests" / "data" / "tiny_toy_digits.safetensors"


def save_tiny_toy(path: Path, seed: int = 0) -> Path:
    """A digits-toy weights file (``policy.pretrained``) with the smallest transformer and text encoder
    of the toy's shape, randomly initialised: 19.7k transformer parameters (the shipped toy has 465k),
    so a checkpoint is ~0.4 MB. ``tests/data/tiny_toy_digits.safetensors`` was made by this (seed 0)."""
    from fastcps.policies.toy import build_transformer, default_transformer_config, save_weights
    from fastcps.toy.text_encoder import ToyTextEncoder, default_text_config

    torch.manual_seed(seed)
    text = dict(default_text_config(), hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text.update(num_attention_heads=1, projection_dim=16)
    encoder = ToyTextEncoder(text)
    config = dict(default_transformer_config(16), num_layers=1, num_single_layers=1)
    config.update(num_attention_heads=1, attention_head_dim=16, axes_dims_rope=[4, 6, 6])
    save_weights(path, build_transformer(config), encoder, config)
    return Path(path)
