"""What the resource plan (``fastcps.plan``) knows of a model family without loading a weight: the
shipped model configs a ``policy.pretrained`` picks, the transformer's inputs for a batch, the latent's
size, the text tokens the transformer sees, the frozen models' published sizes, where the policy puts
the transformer under ZeRO-3 and the anchor recipe the plan compares with. ``Family.plan`` names one of
these classes, so the plan has no switch on family names: a new model is a subclass here (or in its
policy module) and a registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    """A reference recipe's transformer work per image, counted as its code runs it: ``rollout_forwards``
    sampling calls and ``trained_steps`` training forward + backward, each on ``cfg`` samples per image
    (true CFG: cond and uncond), at ``batch`` images a call, ``text_tokens`` text tokens (None: the run's),
    the backward with the re-forward of activation checkpointing when ``checkpointing``, and
    ``reference_forwards`` no-grad forwards of the frozen reference per trained step (the KL term)."""

    name: str
    source: str  # where its numbers are read: repository and file
    rollout_forwards: int
    trained_steps: int
    batch: int
    text_tokens: int | None = None
    cfg: int = 1
    checkpointing: bool = False
    reference_forwards: int = 0


#: flow_grpo's own FLUX.1-dev recipe, like for like with configs/flux_pickscore.json (yifan123/flow_grpo,
#: config/grpo.py ``pickscore_flux_fast``: num_steps 6, sde_window_size 3, noise_level 0.8, sde_type cps,
#: train_batch_size 3 for sampling and training, 24 images per prompt, 2 optimizer steps per epoch;
#: scripts/train_flux.py: T5 prompts of max_sequence_length=128, old log-probs from the sampling, no
#: gradient checkpointing). Per image: 6 forwards in the rollout, 3 trained steps of forward + backward.
FLOW_GRPO_FLUX = Anchor(
    "flow_grpo pickscore_flux_fast",
    "yifan123/flow_grpo config/grpo.py",
    rollout_forwards=6,
    trained_steps=3,
    batch=3,
    text_tokens=128,
)

#: flow_grpo's own SD3.5-Medium GenEval recipe (yifan123/flow_grpo config/grpo.py ``geneval_sd3``: 10 sampling
#: steps, guidance_scale 4.5 as true CFG, train_batch_size 9, 24 images per prompt, timestep_fraction 0.99 =
#: int(10 x 0.99) = 9 trained steps (SDE on every step), beta 0.04; scripts/train_sd3.py: CLIP's 77 + T5's
#: 128 tokens, ``compute_log_prob`` on 2B (train.cfg True), the KL reference as the same call with the
#: adapter disabled under no_grad, old log-probs from the sampling, no gradient checkpointing).
FLOW_GRPO_SD3 = Anchor(
    "flow_grpo geneval_sd3",
    "yifan123/flow_grpo config/grpo.py",
    rollout_forwards=10,
    trained_steps=9,
    batch=9,
    text_tokens=205,
    cfg=2,
    reference_forwards=1,
)

#: FlowCPS's Qwen-Image recipe as its code runs it (IamCreateAI/FlowCPS config/grpo.py
#: ``pickscore_qwenimage_8gpu``: 10 sampling steps, guidance_scale 4 as true CFG, train_batch_size 4,
#: 16 images per prompt, 32 prompts per epoch on 8 GPUs, sde_window_size 2 in (0, 5), beta 0,
#: activation_checkpointing; scripts/train_qwenimage.py). Per image: the rollout's 10 steps each run the
#: conditional and the negative prompt (QwenImagePipeline's true CFG: 2 samples a step); the training
#: loop runs ``compute_log_prob`` on the window's 2 steps, one forward of cond + uncond (2B) each and its
#: backward through the checkpointed blocks; old log-probs come from the sampling (no recompute). Its
#: text length is the prompt's own (the batch's longest, padded): the plan prices it at the run's.
FLOWCPS_QWENIMAGE = Anchor(
    "FlowCPS pickscore_qwenimage_8gpu",
    "IamCreateAI/FlowCPS config/grpo.py",
    rollout_forwards=10,
    trained_steps=2,
    batch=4,
    cfg=2,
    checkpointing=True,
)

#: FlowCPS's FLUX.1 Kontext recipe as its code runs it (IamCreateAI/FlowCPS config/grpo.py
#: ``counting_flux_kontext``: 6 sampling steps, guidance_scale 2.5 embedded, 512 px, train_batch_size 3, 21
#: images per prompt, 48 prompts per epoch (num_batches_per_epoch = 48 / (28 GPUs x 3 / 21) = 12 on its 28
#: GPUs), timestep_fraction 0.99 = int(6 x 0.99) = 5 trained steps, noise_level 0.9 on every step, beta 0;
#: scripts/train_flux_kontext.py: T5 prompts of max_sequence_length=128, LoRA r 64 / alpha 128 on FLUX's
#: targets plus proj_mlp, old log-probs from the sampling, no gradient checkpointing). Every call carries the
#: source image's tokens after the target's (2 x 1024 image tokens at 512 px): ``KontextPlan.inputs``, so
#: the anchor is priced on the same inputs. Per image: 6 rollout forwards, 5 trained forward + backward.
FLOWCPS_KONTEXT = Anchor(
    "FlowCPS counting_flux_kontext",
    "IamCreateAI/FlowCPS config/grpo.py",
    rollout_forwards=6,
    trained_steps=5,
    batch=3,
    text_tokens=128,
)


class FamilyPlan:
    """The plan's facts of a family (class attributes and static hooks; no instances)."""

    #: (substring of ``policy.pretrained`` in lower case, stem of configs/models/<stem>_{transformer,
    #: scheduler}.json): the first that matches; "" matches every id
    model_configs: tuple[tuple[str, str], ...] = ()
    vae_config: str = ""  # configs/models/<vae_config>.json
    vae_class: str = "AutoencoderKL"  # the diffusers VAE class
    #: the policy's text encoders at their published sizes (billions of parameters): the weights cannot be
    #: downloaded here; a local pipeline folder's own files are counted instead when given
    text_encoders: dict[str, float] = {}
    #: the policy leaves the transformer on the CPU under ZeRO-3 for ``fastcps.engine.partition_zero3``
    #: (``Policy.deferred_placement``): the load phase then holds partitions, not the whole model
    deferred_zero3: bool = True
    default_shift: float = 1.0  # the scheduler's shift when its config gives none
    true_cfg: bool = False  # ``policy.cfg_scale`` > 1 runs every velocity on cond + uncond (2B samples)
    anchor: Anchor = FLOW_GRPO_FLUX
    #: the family's further reference recipes: a config that samples and trains the steps of one of them
    #: is compared with that one (``anchor_for``)
    other_anchors: tuple[Anchor, ...] = ()

    @classmethod
    def anchor_for(cls, num_steps: int, trained_steps: float) -> Anchor:
        """The reference recipe with the config's sampling steps and trained steps per image: among
        ``anchor`` and ``other_anchors`` the first that matches, else ``anchor``."""
        for a in (cls.anchor, *cls.other_anchors):
            if a.rollout_forwards == num_steps and a.trained_steps == trained_steps:
                return a
        return cls.anchor

    @staticmethod
    def text_tokens(max_sequence_length: int) -> int:
        """The text tokens the transformer sees for ``policy.max_sequence_length``."""
        return max_sequence_length

    @staticmethod
    def latent_numel(config: dict, resolution: int) -> int:
        """Elements of one image's latent as the policy keeps it (the rollout stores two per trained step)."""
        return (resolution // 16) ** 2 * config["in_channels"]  # 8x VAE, 2x2 patches packed into tokens

    @staticmethod
    def inputs(config: dict, batch: int, resolution: int, text_tokens: int, dtype) -> dict:
        """Keyword arguments of one transformer call on ``batch`` samples."""
        raise NotImplementedError

    @staticmethod
    def vae_latents(config: dict, resolution: int, batch: int, dtype):
        """The latents ``vae.decode`` takes for ``batch`` images of ``resolution``."""
        import torch

        side = resolution // 2 ** (len(config["block_out_channels"]) - 1)
        return torch.randn(batch, config["latent_channels"], side, side, dtype=dtype)


class FluxPlan(FamilyPlan):
    model_configs = (("schnell", "flux1-schnell"), ("", "flux1-dev"))
    vae_config = "flux1_vae"
    text_encoders = {"T5-XXL encoder": 4.762, "CLIP-L text": 0.123}

    @staticmethod
    def inputs(config: dict, batch: int, resolution: int, text_tokens: int, dtype) -> dict:
        import torch

        b, img = batch, (resolution // 16) ** 2  # 8x VAE, then 2x2 patches packed into tokens
        guidance = torch.full((b,), 3.5) if config.get("guidance_embeds") else None
        return dict(
            hidden_states=torch.randn(b, img, config["in_channels"], dtype=dtype),
            timestep=torch.full((b,), 0.5, dtype=dtype),
            guidance=guidance,
            txt_ids=torch.zeros(text_tokens, 3),
            img_ids=torch.zeros(img, 3),
            encoder_hidden_states=torch.randn(b, text_tokens, config["joint_attention_dim"], dtype=dtype),
            pooled_projections=torch.randn(b, config["pooled_projection_dim"], dtype=dtype),
            return_dict=False,
        )


class SD3Plan(FamilyPlan):
    model_configs = (("large", "sd3.5-large"), ("", "sd3.5-medium"))
    vae_config = "sd3.5_vae"
    text_encoders = {"T5-XXL encoder": 4.762, "CLIP-G text": 0.695, "CLIP-L text": 0.123}
    default_shift = 3.0
    true_cfg = True
    anchor = FLOW_GRPO_SD3

    @staticmethod
    def text_tokens(max_sequence_length: int) -> int:
        return max_sequence_length + 77  # CLIP's 77 tokens before T5's

    @staticmethod
    def latent_numel(config: dict, resolution: int) -> int:
        return config["in_channels"] * (resolution // 8) ** 2  # unpacked: the transformer patchifies

    @staticmethod
    def inputs(config: dict, batch: int, resolution: int, text_tokens: int, dtype) -> dict:
        import torch

        side = resolution // 8
        return dict(
            hidden_states=torch.randn(batch, config["in_channels"], side, side, dtype=dtype),
            timestep=torch.full((batch,), 500.0, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], dtype=dtype),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], dtype=dtype),
            return_dict=False,
        )


class QwenImagePlan(FamilyPlan):
    """Qwen-Image: Qwen2.5-VL-7B's last hidden states (3584 wide) as the text, 2x2-packed latents like
    FLUX's (64 channels), true CFG, a causal 3-D VAE decoding one frame.

    Text tokens: a prompt's Qwen tokens after the template is dropped, at most ``policy.max_sequence_length``
    (QwenImagePipeline's cut); the calls pad to the batch's longest. The plan prices every call at the cap
    (``max_sequence_length``): an upper bound for memory, and FlowCPS's anchor is priced at the same
    length, so the ratio compares like with like (PickScore's prompts are shorter: the real calls cost less
    for both)."""

    model_configs = (("", "qwen-image"),)
    vae_config = "qwen-image_vae"
    vae_class = "AutoencoderKLQwenImage"
    #: Qwen2.5-VL-7B-Instruct, the whole Qwen2_5_VLForConditionalGeneration the pipeline loads (vision tower
    #: included): 8.29 B parameters as its model card gives them
    text_encoders = {"Qwen2.5-VL-7B": 8.29}
    true_cfg = True
    anchor = FLOWCPS_QWENIMAGE

    @staticmethod
    def inputs(config: dict, batch: int, resolution: int, text_tokens: int, dtype) -> dict:
        import torch

        side = resolution // 16  # 8x VAE, then 2x2 patches packed into tokens
        return dict(
            hidden_states=torch.randn(batch, side * side, config["in_channels"], dtype=dtype),
            encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], dtype=dtype),
            # no mask: every token real (QwenImagePipeline passes None when the mask is all ones)
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_shapes=[[(1, side, side)]] * batch,
            return_dict=False,
        )

    @staticmethod
    def vae_latents(config: dict, resolution: int, batch: int, dtype):
        import torch

        side = resolution // 2 ** (len(config["dim_mult"]) - 1)
        return torch.randn(batch, config["z_dim"], 1, side, side, dtype=dtype)  # one frame


class KontextPlan(FluxPlan):
    """FLUX.1 Kontext [dev]: FLUX.1-dev's transformer, VAE, text encoders and scheduler (the same
    architecture and configs: configs/models/flux1-dev_*.json), every call on the target's image tokens
    and the source image's after them (``fastcps.policies.kontext``: the source at the run's resolution, so
    twice the image tokens), FlowCPS's recipe as the anchor. The latent the rollout keeps is the target's
    alone; the source's latents are conditioning (one per prompt, in the prompt cache)."""

    model_configs = (("", "flux1-dev"),)
    anchor = FLOWCPS_KONTEXT

    @staticmethod
    def inputs(config: dict, batch: int, resolution: int, text_tokens: int, dtype) -> dict:
        import torch

        kw = FluxPlan.inputs(config, batch, resolution, text_tokens, dtype)
        image = kw["hidden_states"].shape[1]
        kw["hidden_states"] = torch.randn(batch, 2 * image, config["in_channels"], dtype=dtype)
        kw["img_ids"] = torch.zeros(2 * image, 3)
        return kw


#: FlowCPS's Qwen-Image-Edit recipe as its code runs it (IamCreateAI/FlowCPS config/grpo.py
#: ``counting_qwenimage_edit_8gpu``: 10 sampling steps, guidance_scale 4 as true CFG, train_batch_size 4,
#: 16 images per prompt, 32 prompts per epoch on 8 GPUs, noise_level 1.8, sde_window_size 2 in (0, 5),
#: beta 0, activation_checkpointing, geneval 1.0; scripts/train_qwenimage_edit.py). The same loop as
#: pickscore_qwenimage_8gpu: per image 10 rollout steps of cond + uncond, 2 trained steps of one 2B forward
#: and its checkpointed backward, old log-probs from the sampling. Every call carries the reference's tokens
#: after the target's and the VL text with the image tokens: the plan prices both at the run's sizes.
FLOWCPS_QWENIMAGE_EDIT = Anchor(
    "FlowCPS counting_qwenimage_edit_8gpu",
    "IamCreateAI/FlowCPS config/grpo.py",
    rollout_forwards=10,
    trained_steps=2,
    batch=4,
    cfg=2,
    checkpointing=True,
)

#: FlowCPS's 32-GPU Qwen-Image-Edit recipe (config/grpo.py ``counting_qwenimage_edit``, the one its
#: scripts/multi_node/qwenimage_edit/main.sh launches on 4 x 8 GPUs): as the 8-GPU one but noise_level 1.0
#: and sde_window_size 0, which scripts/train_qwenimage_edit.py trains on num_steps - 1 = 9 steps per
#: image; rewards image_similarity 0.2 + geneval 0.8; the same 512 images per epoch.
FLOWCPS_QWENIMAGE_EDIT_32GPU = Anchor(
    "FlowCPS counting_qwenimage_edit",
    "IamCreateAI/FlowCPS config/grpo.py",
    rollout_forwards=10,
    trained_steps=9,
    batch=4,
    cfg=2,
    checkpointing=True,
)

#: QwenImageEditPipeline's reference: calculate_dimensions(1024 * 1024, 1) = 1024 px for a square source,
#: 8x VAE, 2x2 patches: 64 x 64 tokens after the target's
EDIT_REFERENCE_SIDE = 1024 // 16
#: Qwen2.5-VL's image tokens of the 1024 px reference: Qwen2VLImageProcessor's smart_resize rounds 1024 to
#: 1036 (a multiple of 28 = 14-px patches x 2x2 merge), 37 x 37 merged patches
EDIT_IMAGE_TOKENS = 37 * 37
#: the kept template around them: <|vision_start|>, <|vision_end|> and, after the instruction, <|im_end|>,
#: a newline, <|im_start|>, "assistant" and a newline (the 64 dropped tokens are the system turn before)
EDIT_TEMPLATE_TOKENS = 2 + 5


class QwenImageEditPlan(QwenImagePlan):
    """Qwen-Image-Edit: Qwen-Image's transformer, VAE and text encoder; each call carries the reference
    image's 4096 tokens after the target's, and the VL text holds the reference's 1369 image tokens.

    Text tokens: the image tokens, the kept template and ``policy.max_sequence_length`` as the bound of the
    instruction's tokens (the edit pipeline cuts nothing; counting_edit's instructions are ~12 tokens)."""

    anchor = FLOWCPS_QWENIMAGE_EDIT
    other_anchors = (FLOWCPS_QWENIMAGE_EDIT_32GPU,)

    @staticmethod
    def text_tokens(max_sequence_length: int) -> int:
        return EDIT_IMAGE_TOKENS + EDIT_TEMPLATE_TOKENS + max_sequence_length

    @staticmethod
    def inputs(config: dict, batch: int, resolution: int, text_tokens: int, dtype) -> dict:
        import torch

        side, ref = resolution // 16, EDIT_REFERENCE_SIDE
        tokens = side * side + ref * ref  # [target; reference]
        return dict(
            hidden_states=torch.randn(batch, tokens, config["in_channels"], dtype=dtype),
            encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], dtype=dtype),
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_shapes=[[(1, side, side), (1, ref, ref)]] * batch,
            return_dict=False,
        )
