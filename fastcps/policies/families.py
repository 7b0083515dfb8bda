"""The model families fastcps trains, by ``policy.name``: one registry that the trainer (``build_policy``),
the plan (``fastcps.plan``) and the fetcher (``fastcps.fetch``) read, so a new model is one entry here
and one policy module, not a switch to edit in each of them.

A ``Family`` holds what is known of a model without loading it: where its policy class lives (imported
on first use: the plan and the fetcher never load diffusers' pipelines), the diffusers transformer class,
the LoRA modules its anchors adapt, and the class of its resource-plan facts (``fastcps.policies.plan_facts``:
shipped model configs, transformer inputs, latent size, frozen models, anchor recipe), which the plan reads
instead of switching on family names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

#: flow_grpo's FLUX targets, verbatim (yifan123/flow_grpo scripts/train_flux.py, ``target_modules``): every
#: block's ``attn`` projections (the single blocks have ``attn.to_q/k/v`` only) and the double blocks'
#: feed-forwards. peft matches a name when a module's path ends with ``.<name>`` (tests/test_policies.py
#: lists the modules on the real FLUX.1-dev).
FLUX_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)

#: FlowCPS's FLUX.1 Kontext targets, verbatim (IamCreateAI/FlowCPS scripts/train_flux_kontext.py,
#: ``target_modules``): flow_grpo's FLUX list plus ``proj_mlp``, the single blocks' feed-forward input (their
#: MLP's first linear; its output half is ``proj_out``, which stays frozen)
KONTEXT_LORA_TARGETS = FLUX_LORA_TARGETS + ("proj_mlp",)

#: flow_grpo's SD3.5 targets, verbatim (yifan123/flow_grpo scripts/train_sd3.py, ``target_modules``): the
#: joint attention's projections of every block (``attn.*``; the last block, ``context_pre_only``, has no
#: ``attn.to_add_out``), no feed-forward, and not the second self-attention ``attn2`` of SD3.5-Medium's
#: dual-attention blocks 0-12: peft matches ``attn.to_q`` on a path ending with ``.attn.to_q`` only, where a
#: bare ``to_q`` also takes ``attn2.to_q`` (52 more modules on SD3.5-Medium; tests/test_policies.py lists the
#: 191 adapted ones)
SD3_LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)

#: FlowCPS's Qwen-Image targets, verbatim (IamCreateAI/FlowCPS scripts/train_qwenimage.py,
#: ``target_modules``): the joint attention's projections and both streams' feed-forwards, which Qwen-Image
#: names ``img_mlp`` / ``txt_mlp`` (FLUX: ``ff`` / ``ff_context``)
QWENIMAGE_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


@dataclass(frozen=True)
class Family:
    name: str  # the value of ``policy.name``
    policy: str  # "module:Class" of the policy, imported on first use
    transformer: str | None  # the diffusers transformer class (None: the toy's own)
    lora_targets: tuple[str, ...]  # the modules LoRA adapts when ``policy.lora.target_modules`` is empty
    example: str  # a ``policy.pretrained`` that loads (a hub id)
    plan: str | None = None  # "module:Class" of its ``plan_facts.FamilyPlan`` (None: the plan refuses it)
    editing: bool = False  # edits source images (prompt rows with "image"), not text-to-image

    def policy_class(self):
        module, cls = self.policy.split(":")
        return getattr(importlib.import_module(module), cls)

    def transformer_class(self):
        import diffusers

        return getattr(diffusers, self.transformer)

    def plan_facts(self):
        """The family's ``FamilyPlan`` class; a ValueError naming the families the plan covers otherwise."""
        if self.plan is None:
            covered = ", ".join(f.name for f in FAMILIES.values() if f.plan)
            raise ValueError(
                f"policy.name = {self.name!r}: the plan covers {covered} (the toy needs no plan)"
            )
        module, cls = self.plan.split(":")
        return getattr(importlib.import_module(module), cls)


def registry(*families: Family) -> dict[str, Family]:
    """``FAMILIES`` by name; a ValueError for a name given twice (a dict would keep the last silently: two
    branches that each add the same family merge into two entries, and the later one wins)."""
    names = [f.name for f in families]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"model families registered twice: {', '.join(twice)}; keep one entry each")
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = registry(
    Family("toy", "fastcps.policies.toy:ToyDigitsPolicy", None, FLUX_LORA_TARGETS, ""),
    Family(
        "flux",
        "fastcps.policies.flux:FluxPolicy",
        "FluxTransformer2DModel",
        FLUX_LORA_TARGETS,
        "black-forest-labs/FLUX.1-dev",
        "fastcps.policies.plan_facts:FluxPlan",
    ),
    Family(
        "sd3",
        "fastcps.policies.sd3:SD3Policy",
        "SD3Transformer2DModel",
        SD3_LORA_TARGETS,
        "stabilityai/stable-diffusion-3.5-medium",
        "fastcps.policies.plan_facts:SD3Plan",
    ),
    Family(
        "qwenimage",
        "fastcps.policies.qwenimage:QwenImagePolicy",
        "QwenImageTransformer2DModel",
        QWENIMAGE_LORA_TARGETS,
        "Qwen/Qwen-Image",
        "fastcps.policies.plan_facts:QwenImagePlan",
    ),
    Family(
        "kontext",
        "fastcps.policies.kontext:FluxKontextPolicy",
        "FluxTransformer2DModel",
        KONTEXT_LORA_TARGETS,
        "black-forest-labs/FLUX.1-Kontext-dev",
        "fastcps.policies.plan_facts:KontextPlan",
        editing=True,
    ),
    Family(  # Qwen-Image's transformer: FlowCPS's train_qwenimage_edit.py adapts the same modules
        "qwenimage_edit",
        "fastcps.policies.qwenimage_edit:QwenImageEditPolicy",
        "QwenImageTransformer2DModel",
        QWENIMAGE_LORA_TARGETS,
        "Qwen/Qwen-Image-Edit",
        "fastcps.policies.plan_facts:QwenImageEditPlan",
        editing=True,
    ),
)


def family(name: str) -> Family:
    """The family of ``policy.name``; a KeyError naming the choices otherwise."""
    if name not in FAMILIES:
        raise KeyError(f"policy.name = {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
