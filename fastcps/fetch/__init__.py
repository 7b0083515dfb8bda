"""Every file a run config needs, fetched before the run and checked at its start.

``python -m fastcps.fetch --config CONFIG [--set k=v ...] [--dry-run]`` downloads the policy's weights (the
subfolders it loads), every reward's models and processors, and the named prompt sets into the Hugging
Face cache (HF_HOME, HF_TOKEN as huggingface_hub reads them) and prints what and how large. The trainer
calls ``ensure_local(cfg)`` before it loads anything (``fastcps.fetch.ensure``).

Policies and rewards declare their files next to their arguments: ``DiffusersPolicy.files(policy_cfg)``,
``RewardClass.files(args)`` returning ``fastcps.fetch.items`` (hub repos with the files they need, local
paths, prompt sets, the source images of edit rows, models a library downloads itself)."""

from fastcps.fetch.ensure import ensure_local
from fastcps.fetch.items import EditImages, EngineModels, HubRepo, LocalPath, PromptSetFile
from fastcps.fetch.needs import config_items

__all__ = [
    "EditImages",
    "EngineModels",
    "HubRepo",
    "LocalPath",
    "PromptSetFile",
    "config_items",
    "ensure_local",
]
