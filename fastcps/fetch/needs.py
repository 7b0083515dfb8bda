"""Every file a run config needs, as ``fastcps.fetch.items``: the policy's (``policy.pretrained``), each
reward's (its class's ``files(args)``), the prompt sets (``prompts.source`` / ``prompts.eval_source``) and
the source images of their edit rows."""

from __future__ import annotations

import dataclasses
import importlib

from fastcps.fetch.items import EditImages, Item, LocalPath, PromptSetFile, with_key_prefix


def policy_items(policy_cfg) -> list[Item]:
    from fastcps.policies.families import family

    if policy_cfg.name == "toy":  # its weights are in the package unless a path is given
        return (
            [LocalPath(policy_cfg.pretrained, "policy.pretrained", "toy weights")]
            if policy_cfg.pretrained
            else []
        )
    return family(policy_cfg.name).policy_class().files(policy_cfg)


def reward_class(name: str):
    from fastcps.rewards import REGISTRY

    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def reward_items(index: int, reward_cfg) -> list[Item]:
    """The reward's own declaration (``files(args)``, keys relative to its args); a reward without one
    (registered from outside fastcps) declares nothing: it loads what it loads when the trainer loads it."""
    files = getattr(reward_class(reward_cfg.name), "files", None)
    if files is None:
        return []
    return with_key_prefix(list(files(dict(reward_cfg.args))), f"rewards.{index}.args.")


def prompt_items(prompts_cfg) -> list[Item]:
    from fastcps import prompt_sets
    from fastcps.edit_images import declares_images

    out: list[Item] = []
    for key in ("source", "eval_source"):
        value = getattr(prompts_cfg, key)
        if value is None or value == "digits":
            continue
        if prompt_sets.looks_like_name(value):
            out.append(PromptSetFile(value, f"prompts.{key}"))
        else:
            out.append(LocalPath(value, f"prompts.{key}", "prompt file"))
        if declares_images(value):  # after its prompt file: a named set downloads before its images
            out.append(EditImages(value, f"prompts.{key}"))
    return out


def config_items(cfg, *, policy: bool = True) -> list[Item]:
    """Everything ``cfg`` needs, each once (the first config key that names it is kept). ``policy``: False
    when the caller brings its own policy object (the trainer's tests)."""
    items = policy_items(cfg.policy) if policy else []
    for i, r in enumerate(cfg.rewards):
        items += reward_items(i, r)
    items += prompt_items(cfg.prompts)
    seen, out = set(), []
    for it in items:
        ident = (type(it), dataclasses.replace(it, key=""))
        if ident not in seen:
            seen.add(ident)
            out.append(it)
    return out
