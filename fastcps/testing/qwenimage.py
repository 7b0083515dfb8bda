"""A tiny random-weight Qwen-Image pipeline (``QwenImagePipeline``) saved like a hub snapshot
(``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), for the tests: the
``qwenimage`` policy loads it with ``from_pretrained(path, subfolder=...)`` as it loads Qwen/Qwen-Image.
Nothing downloads: the tokenizer is a byte-level BPE built here.

What the policy depends on keeps the real model's structure: a Qwen2.5-VL text model whose prompt template
tokenizes to Qwen's 34-token prefix (the pipeline drops exactly 34 tokens), the 16-channel video VAE with
Qwen-Image's per-channel latents mean and std (so a decode without the normalisation is visibly wrong),
2x2 packing into 64 token channels, and Qwen-Image's scheduler config (dynamic exponential shift,
``shift_terminal``).
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_DIM = 32  # Qwen2.5-VL-7B: 3584 (the transformer's joint_attention_dim)

#: Qwen/Qwen-Image scheduler/scheduler_config.json (configs/models/qwen-image_scheduler.json)
QWENIMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)

# The words of QwenImagePipeline.prompt_template_encode, each one BPE token as in Qwen's vocabulary (a
# leading "Ġ" is the byte-level space): with them the template's prefix is Qwen's 34 tokens.
_WORDS = (
    "system Describe Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture Ġquantity Ġtext Ġspatial "
    "Ġrelationships Ġof Ġobjects Ġand Ġbackground user assistant Ġa Ġcat Ġred Ġbus"
).split()
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet (Qwen2's): printable bytes map to themselves, the rest to 256 + n."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(extra))]


def qwen_tokenizer():
    """A ``Qwen2Tokenizer`` over the 256 byte symbols plus the template's words (merged left to right,
    one merge per added character) and Qwen's special tokens; every other word is spelled byte by byte."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        for end in range(2, len(word) + 1):
            pair = (word[: end - 1], word[end - 1])
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append(pair)
    for s in _SPECIAL:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIAL], special_tokens=True)
    return tok, len(vocab)


def _text_encoder(tok, vocab: int, hidden: int = TEXT_DIM):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 2
    ids = {
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
    }
    half_head = hidden // heads // 2  # M-RoPE splits a head's rotary half over (time, height, width)
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "rope_scaling": {
                "mrope_section": [half_head // 4, half_head // 4, half_head - 2 * (half_head // 4)],
                "rope_type": "default",
                "type": "default",
            },
            "rope_theta": 1000000.0,
            **ids,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
        },
        vocab_size=vocab,
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def save_tiny_qwenimage(folder: str | Path, *, seed: int = 0) -> Path:
    """A QwenImagePipeline shaped like Qwen/Qwen-Image (2 blocks, 2 heads of 16, a 32-wide Qwen2.5-VL
    text model, a 16-channel VAE 8x down with 3 temporal-causal stages and Qwen-Image's latents mean/std).
    ~1 MB of weights."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    tok, vocab = qwen_tokenizer()
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
    vae = AutoencoderKLQwenImage(  # latents_mean / latents_std: the class defaults are Qwen-Image's
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER),
        vae=vae,
        text_encoder=_text_encoder(tok, vocab),
        tokenizer=tok,
        transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n = len(tok(prefix)["input_ids"])
    if n != pipe.prompt_template_encode_start_idx:  # the pipeline drops this many tokens whatever they are
        raise AssertionError(f"the tiny tokenizer spells the template's prefix in {n} tokens, Qwen's in 34")
    pipe.save_pretrained(folder)
    return folder
