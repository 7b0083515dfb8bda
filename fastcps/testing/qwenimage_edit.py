"""A tiny random-weight Qwen-Image-Edit pipeline (``QwenImageEditPipeline``) saved like a hub snapshot
(``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``processor/``, ``scheduler/``), for the
tests: the ``qwenimage_edit`` policy loads it as it loads Qwen/Qwen-Image-Edit. Nothing downloads.

It is ``fastcps.testing.qwenimage``'s tiny Qwen-Image (same transformer, VAE, scheduler) with what editing
adds: Qwen's vision tokens in the byte-level tokenizer, a Qwen2.5-VL whose one-block vision tower reads the
source image (the config's image-token ids point at the tiny vocabulary's), and a ``Qwen2VLProcessor`` whose
image processor caps an image at 2x2 merged patches (Qwen-Image-Edit's: up to 12845056 pixels), so the VL
encoding carries image tokens as the real one does, few of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastcps.testing.qwenimage import QWENIMAGE_SCHEDULER, TEXT_DIM, _text_encoder, qwen_tokenizer

VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PATCH, MERGE = 14, 2  # Qwen2-VL's patch and merge sizes: one image token per 28 x 28 pixels
MAX_PIXELS = (PATCH * MERGE) ** 2 * 4  # a 1024 px reference -> 56 x 56 px -> 4 image tokens


def edit_tokenizer():
    """``qwen_tokenizer`` with Qwen's vision special tokens added (ids after its vocabulary)."""
    from tokenizers import AddedToken

    tok, _ = qwen_tokenizer()
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in VISION], special_tokens=True)
    return tok, len(tok)


def save_tiny_qwenimage_edit(folder: str | Path, *, seed: int = 0) -> Path:
    """A QwenImageEditPipeline shaped like Qwen/Qwen-Image-Edit, ~1 MB of weights."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    folder = Path(folder)
    torch.manual_seed(seed)
    tok, vocab = edit_tokenizer()
    encoder = _text_encoder(tok, vocab)
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    for k, v in ids.items():  # the model finds the image's tokens by these ids (M-RoPE positions, scatter)
        setattr(encoder.config, k, v)
        setattr(encoder.model.config, k, v)
    sizes = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=(PATCH * MERGE) ** 2,
        max_pixels=MAX_PIXELS,
        size={"shortest_edge": (PATCH * MERGE) ** 2, "longest_edge": MAX_PIXELS},
        **sizes,
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**sizes)
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        processor=processor,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder
