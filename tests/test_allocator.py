"""The caching allocator's expandable segments: on by default in the entry points that train, set before
CUDA initialises, never over a setting the user made (fastcps.allocator says why)."""

import os

import pytest

from fastcps import allocator


def test_set_when_absent_and_kept_when_the_user_set_it(monkeypatch):
    monkeypatch.setattr(allocator, "supported", lambda: True)
    env = {}
    assert allocator.enable_expandable_segments(env) == "expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name, value in (
        ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512"),
        ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False"),
        ("PYTORCH_CUDA_ALLOC_CONF", ""),  # set, even empty: the user's
        ("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync"),  # torch's newer name, which wins over the old
    ):
        env = {name: value}
        assert allocator.enable_expandable_segments(env) is None
        assert env == {name: value}
    monkeypatch.setattr(allocator, "supported", lambda: False)  # Windows, ROCm, a CPU-only build
    env = {}
    assert allocator.enable_expandable_segments(env) is None and env == {}


def test_supported_on_a_linux_cuda_build(monkeypatch):
    import torch

    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)
    assert allocator.supported()
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build
    assert not allocator.supported()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(allocator.sys, "platform", "win32")
    assert not allocator.supported()


@pytest.mark.parametrize("entry", ["train", "gpucheck"])
def test_the_training_entry_points_set_it_first(entry, monkeypatch, tmp_path, capsys):
    """fastcps.train.main and fastcps.gpucheck's main set it before anything else: even a run that stops
    at its config (exit 2, before any CUDA call) has it, and a user's value stays."""
    monkeypatch.setattr(allocator, "supported", lambda: True)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    if entry == "train":
        from fastcps.train import main

        argv = ["--config", str(tmp_path / "missing.json")]
    else:
        from fastcps.gpucheck.check import main

        argv = ["--parts", "nothing", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert main(argv) == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"
