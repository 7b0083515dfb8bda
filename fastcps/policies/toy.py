"""The embedded toy policy: a tiny diffusers ``FluxTransformer2DModel`` in pixel space on 16×16 digits.

Everything follows FLUX's conventions so the trainer exercises the same code path as FLUX.1:
packed 2×2 tokens (``in_channels = 4``), ``img_ids`` / ``txt_ids`` for the RoPE, ``timestep = σ``
(FluxPipeline passes ``t / 1000`` with ``t = 1000·σ``; the transformer multiplies by 1000 inside),
``guidance_embeds = False`` (no guidance distillation in the toy), per-token text states plus a
pooled text vector from the toy's own text encoder.

Schedule: ``sigmas(N)`` asks diffusers' ``FlowMatchEulerDiscreteScheduler`` (static ``shift = 1``,
no dynamic shift) for the sigmas FluxPipeline passes, ``linspace(1, 1/N, N)``, plus the trailing 0.
We pass them explicitly because the scheduler's own default grid ends at σ_min = 1/1000, which
spends the last of 8 steps going from 0.001 to 0 and leaves a 0.14 → 0.001 jump before it.
A 16×16 image needs no resolution shift (FLUX's shift grows with the token count; 64 tokens is far
below its base of 256).

Base weights: ``fastcps/assets/toy_digits_base.safetensors`` (transformer + text encoder, configs in
the safetensors metadata), made by ``python -m fastcps.toy.pretrain``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from fastcps.policies.base import Cond, Policy
from fastcps.schedule import pipeline_sigmas
from fastcps.toy.digits import IMAGE_SIZE, NUM_TOKENS, TOKEN_CHANNELS, image_ids, unpack
from fastcps.toy.text_encoder import ToyTextEncoder

__all__ = [
    "DEFAULT_WEIGHTS",
    "ToyDigitsPolicy",
    "build_transformer",
    "default_transformer_config",
    "load_weights",
    "save_weights",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "toy_digits_base.safetensors"


def default_transformer_config(text_hidden: int = 64) -> dict:
    # ~0.47M parameters (1.9 MB fp32): fwd+bwd at batch 32 takes ~80 ms on 2 CPU cores.
    return {
        "patch_size": 1,
        "in_channels": TOKEN_CHANNELS,
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": text_hidden,
        "pooled_projection_dim": text_hidden,
        "guidance_embeds": False,
        "axes_dims_rope": [8, 12, 12],  # sums to attention_head_dim; (unused, row, col) as in FLUX
    }


def build_transformer(config: dict) -> FluxTransformer2DModel:
    cfg = dict(config)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def save_weights(
    path: str | Path,
    transformer: FluxTransformer2DModel,
    text_encoder: ToyTextEncoder,
    transformer_config: dict,
    extra: dict | None = None,
) -> None:
    """One safetensors file: ``transformer.*`` and ``text_encoder.*`` tensors, configs as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {
        f"transformer.{k}": v.detach().to("cpu", torch.float32).contiguous()
        for k, v in transformer.state_dict().items()
    }
    tensors.update(
        {
            f"text_encoder.{k}": v.detach().to("cpu", torch.float32).contiguous()
            for k, v in text_encoder.model.state_dict().items()
        }
    )
    meta = {
        "format": "fastcps-toy-digits-v1",
        "transformer_config": json.dumps(transformer_config, sort_keys=True),
        "text_encoder_config": json.dumps(text_encoder.config_dict, sort_keys=True),
        "vocab": json.dumps(list(text_encoder.tokenizer.vocab)),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_weights(path: str | Path) -> tuple[FluxTransformer2DModel, ToyTextEncoder, dict]:
    """(transformer fp32, text encoder fp32, metadata). Raises FileNotFoundError naming the path."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"toy policy weights not found at {str(path)!r}. Set the config key `policy.pretrained` to "
            f"an existing file, leave it empty for the shipped base ({DEFAULT_WEIGHTS}), or make one with "
            "`python -m fastcps.toy.pretrain --out <path>`."
        )
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != "fastcps-toy-digits-v1":
        raise ValueError(
            f"{path} is not a fastcps toy-digits weights file (metadata format="
            f"{meta.get('format')!r}); make one with `python -m fastcps.toy.pretrain`"
        )
    state = load_file(str(path))
    tcfg = json.loads(meta["transformer_config"])
    transformer = build_transformer(tcfg)
    transformer.load_state_dict(
        {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}, strict=True
    )
    text_encoder = ToyTextEncoder(json.loads(meta["text_encoder_config"]))
    text_encoder.model.load_state_dict(
        {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}, strict=True
    )
    return transformer, text_encoder, meta


class ToyDigitsPolicy(Policy):
    """16×16 handwritten digits from prompts like "a handwritten digit seven".

    ``weights=None`` loads the shipped base. The whole transformer trains (no LoRA: it has 0.47M
    parameters); the text encoder is frozen. ``reference`` yields a frozen deep copy of the base
    transformer taken at construction, kept outside DeepSpeed.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        shift: float = 1.0,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.shift = float(shift)
        self.weights_path = Path(weights) if weights else DEFAULT_WEIGHTS
        transformer, text_encoder, meta = load_weights(self.weights_path)
        self.metadata = meta
        transformer = transformer.to(self.device)
        if dtype != torch.float32:  # (a no-op .to(dtype) still makes diffusers warn)
            transformer = transformer.to(dtype)
        self.transformer = transformer.train()
        # The text encoder stays fp32 and frozen; its outputs are cast to `dtype` per call.
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self._reference = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.img_ids = image_ids(device=self.device, dtype=torch.float32)
        self.txt_ids = torch.zeros(self.text_encoder.tokenizer.max_length, 3, device=self.device)
        self._sigma_cache: dict[int, torch.Tensor] = {}

    # --- Policy interface -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        hidden, pooled = self.text_encoder.encode(list(prompts), device=self.device)
        return {"encoder_hidden_states": hidden.float(), "pooled_projections": pooled.float()}

    def latent_shape(self) -> tuple[int, ...]:
        return (NUM_TOKENS, TOKEN_CHANNELS)

    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps not in self._sigma_cache:
            # a static shift, the FLUX grid: what SD3's scheduler config gives (fastcps.schedule)
            self._sigma_cache[num_steps] = pipeline_sigmas({"shift": self.shift}, 0, num_steps)
        return self._sigma_cache[num_steps].to(device or self.device)

    def velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        if latents.shape[1:] != self.latent_shape():
            raise ValueError(
                f"latents must be [B, {NUM_TOKENS}, {TOKEN_CHANNELS}], got {tuple(latents.shape)}"
            )
        sigma, hidden, pooled = self.batch_inputs(latents, sigma, cond)
        dtype = self.dtype
        out = model(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=hidden.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigma.to(dtype),  # σ, not 1000·σ: the transformer scales by 1000 itself
            img_ids=self.img_ids.to(latents.device),
            txt_ids=self.txt_ids.to(latents.device),
            return_dict=False,
        )[0]
        return out.to(latents.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        img = unpack(latents.detach().float(), IMAGE_SIZE, IMAGE_SIZE)  # [B,1,16,16] in ~[-1,1]
        img = ((img + 1.0) * 0.5).clamp(0.0, 1.0)
        return img.repeat(1, 3, 1, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.lora:  # adapters off = the base, without a second copy of it
            with super().reference(model) as base:
                yield base
        else:
            yield self._reference
