"""Test fixtures, not training API: tiny random-weight FLUX and SD3 pipelines (for the tests and
``fastcps.gpucheck``, which builds them on the GPU machine too), saved with ``save_pretrained`` into a
folder laid out exactly like a hub snapshot (``transformer/``, ``vae/``, ``text_encoder*/``,
``tokenizer*/``, ``scheduler/``), so the real ``flux`` and ``sd3`` policies load them with
``from_pretrained(path,
subfolder=...)`` as they load FLUX.1-dev. Nothing downloads: the tokenizers are built here (a
byte-level CLIP BPE vocabulary with no merges, a T5 Unigram vocabulary of single characters).

The architecture keeps the real models' structure where the policy depends on it: 16 latent
channels, an 8x VAE (4 blocks), FLUX's 2x2 packing (64 token channels), guidance embedding (dev),
dynamic shift (dev) / static shift (schnell, SD3), SD3's two CLIPs + T5 and its dual attention.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

CLIP_DIM = 32
T5_DIM = 32


def _clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256 + n.
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(len(extra))]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )
    return tok, len(vocab)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -2.5) for c in string.ascii_letters + string.digits + '"']
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    return tok, len(pieces)


def _clip(vocab: int, with_projection: bool, hidden: int = CLIP_DIM, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5(vocab: int, d_model: int = T5_DIM, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=layers,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=64,
    ).eval()


def save_tiny_flux(
    folder: str | Path,
    *,
    schnell: bool = False,
    seed: int = 0,
    t5_dim: int = T5_DIM,
    clip_dim: int = CLIP_DIM,
    pipeline: str = "FluxPipeline",
) -> Path:
    """A FluxPipeline like FLUX.1-dev (guidance embedding, dynamic shift) or, with ``schnell``,
    like FLUX.1-schnell (no guidance, static shift 1). ~0.5 MB of weights. ``t5_dim=4096,
    clip_dim=768`` gives one-layer text encoders with FLUX.1's real output widths, so the real-size
    transformer can replace the tiny one (``fastcps.gpucheck``). ``pipeline``: the diffusers class saved
    with the same components (``FluxKontextPipeline``: ``fastcps.testing.kontext``)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok, v1 = _clip_tokenizer(Path(tmp))
    tok2, v2 = _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_dim,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    )
    if schnell:
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    else:  # FLUX.1-dev's scheduler_config.json
        sched = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )
    wide = t5_dim != T5_DIM or clip_dim != CLIP_DIM  # one layer each: a 4096-wide T5 layer is 67 MB
    pipe = getattr(diffusers, pipeline)(
        scheduler=sched,
        vae=_vae(0.3611, 0.1159),
        text_encoder=_clip(v1, False, clip_dim, layers=1 if wide else 2),
        tokenizer=tok,
        text_encoder_2=_t5(v2, t5_dim, layers=1 if wide else 2),
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_sd3(folder: str | Path, *, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline shaped like SD3.5-Medium (two CLIPs with projection + T5, qk RMS
    norm, dual-attention layers, static shift 3). ~0.5 MB of weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok, v1 = _clip_tokenizer(Path(tmp))
    tok3, v3 = _t5_tokenizer()
    half = CLIP_DIM // 2  # the two CLIPs' hidden states are concatenated, then padded to T5's width
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=2 * half,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, 0.0609),
        text_encoder=_clip(v1, True, half),
        tokenizer=tok,
        text_encoder_2=_clip(v1, True, half),
        tokenizer_2=tok,
        text_encoder_3=_t5(v3),
        tokenizer_3=tok3,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    save_tiny_flux(Path(sys.argv[1]) / "flux")
    save_tiny_sd3(Path(sys.argv[1]) / "sd3")


# --- geneval: a tiny Mask2Former and a tiny open_clip CLIP ---------------------------------------------

TINY_GENEVAL_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,  # as GenEval's OpenAI ViT-L-14
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_mask2former(num_queries: int = 10, label: str | None = None, seed: int = 0):
    """A random-weight ``Mask2FormerForUniversalSegmentation`` (Swin backbone of ~0.35 M parameters, 80
    COCO classes). ``label`` (a GenEval object name): every query predicts that class with probability
    ~0.99 (zero class weights, one large bias), so detections pass GenEval's thresholds; None = random."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from fastcps.rewards.geneval.mask2former import OBJECT_NAMES

    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=swin,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=num_queries,
        num_labels=len(OBJECT_NAMES),
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if label is not None:
        head = model.class_predictor
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(-5.0)
            head.bias[OBJECT_NAMES.index(label)] = 5.0
    return model


def save_tiny_geneval(folder: str | Path, *, label: str | None = "car", seed: int = 0) -> dict:
    """A tiny Mask2Former (``tiny_mask2former``) and a tiny open_clip CLIP with random weights, saved under
    ``folder``; returns the ``geneval`` reward's args that score with them (``build_reward("geneval",
    args)``): detector mask2former, the detector's input at most 64 x 128 pixels, CPU-sized."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    tiny_mask2former(label=label, seed=seed).save_pretrained(folder / "mask2former")
    torch.manual_seed(seed + 1)
    clip = open_clip.CLIP(**TINY_GENEVAL_CLIP)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "clip.safetensors"))
    return {
        "detector": "mask2former",
        "model": str(folder / "mask2former"),
        "clip_pretrained": str(folder / "clip.safetensors"),
        "clip_config": TINY_GENEVAL_CLIP,
        "detect_size": [64, 128],
    }
