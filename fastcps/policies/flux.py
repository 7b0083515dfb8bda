"""FLUX.1-dev / FLUX.1-schnell through diffusers' ``FluxPipeline`` components.

Loading: every component comes from ``from_pretrained(path, subfolder=...)`` (``transformer``, ``vae``,
``text_encoder`` = CLIP-L, ``text_encoder_2`` = T5-XXL, ``tokenizer``/``tokenizer_2``, ``scheduler``),
so a local snapshot of ``black-forest-labs/FLUX.1-dev`` and the hub id load the same way.

Conventions, as ``FluxPipeline.__call__`` does them (diffusers 0.42):
- latents are packed 2x2 patches of the 16-channel VAE latent: ``(L, 64)`` per image with
  ``L = (res/16)^2`` (1024 tokens at 512 px); ``img_ids`` carry (0, row, col) for the RoPE,
  ``txt_ids`` are zeros;
- ``timestep = (1000·σ).to(dtype) / 1000``: FluxPipeline casts the scheduler's ``t = 1000·σ`` to the
  latents' dtype (the model's: bf16 for the recipes) and passes ``t / 1000``; the transformer multiplies
  by 1000 again. We do the same casts, so the transformer sees the pipeline's value bit for bit;
- guidance is distilled: dev has a guidance embedding and gets ``guidance`` (3.5) per sample;
  schnell has none;
- schedule: ``linspace(1, 1/N, N)`` with the dynamic (resolution-dependent) shift
  ``mu = calculate_shift(L, ...)`` from the scheduler config when ``use_dynamic_shifting`` (dev),
  else the config's static ``shift`` (schnell: 1), plus the trailing 0;
- decode: unpack, ``z / scaling_factor + shift_factor``, VAE decode in fp32, ``x/2 + 0.5`` clamped to
  [0, 1], quantised to 8-bit levels (``DiffusersPolicy.decode``).

Text encoders and VAE are frozen (no grad, eval). The VAE is kept and run in fp32 whatever
``policy.dtype``, as flow_grpo does (scripts/train_flux.py and train_sd3.py: ``pipeline.vae.to(device,
dtype=torch.float32)``): 84 M parameters for FLUX.1 and SD3.5, 335 MB instead of 168 MB in bf16, and
its decode's activations twice those of a bf16 decode. With ``offload_frozen`` the text encoders go back
to the CPU after each ``encode`` (the trainer caches every prompt's encoding, so they run rarely).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from fastcps.policies.base import Cond, Policy
from fastcps.schedule import pipeline_sigmas


def resolve_pretrained(pretrained: str, family: str, example: str, subfolders: tuple[str, ...]) -> str:
    """A local pipeline folder or a hub id; raises FileNotFoundError naming `policy.pretrained`."""
    if not pretrained:
        raise FileNotFoundError(
            f"config key `policy.pretrained` is empty: the {family} policy needs a local pipeline folder or "
            "a "
            f"hub id, e.g. --set policy.pretrained={example}"
        )
    p = Path(os.path.expanduser(pretrained))
    if is_hub_id(pretrained):
        return pretrained  # a hub id: from_pretrained resolves it (cache, or download when online)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{family} weights not found at {pretrained!r} (config key `policy.pretrained`): give a folder "
            f"holding a diffusers pipeline ({', '.join(subfolders)}/), or a hub id such as {example}"
        )
    missing = [s for s in subfolders if not (p / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{pretrained!r} (config key `policy.pretrained`) is not a complete {family} pipeline folder: "
            f"missing {', '.join(s + '/' for s in missing)}"
        )
    return str(p)


def is_hub_id(pretrained: str) -> bool:
    """``org/name`` that is not a path here (absolute, ./ or ~/, or existing) is a hub id."""
    p = Path(os.path.expanduser(pretrained))
    local = p.is_absolute() or pretrained.startswith((".", "~")) or p.exists() or pretrained.count("/") != 1
    return bool(pretrained) and not local


def _config_file(subfolder: str) -> str:
    """The file ``from_pretrained(..., subfolder=)`` opens first in a pipeline's subfolder."""
    if subfolder.startswith("tokenizer"):
        return "tokenizer_config.json"
    return "scheduler_config.json" if subfolder.startswith("scheduler") else "config.json"


def load_component(cls, path: str, subfolder: str, **kw):
    from fastcps.rewards._util import hub_kwargs

    # HF_HUB_OFFLINE=1: local_files_only as well, since diffusers 0.42 asks the hub for a sharded
    # checkpoint's file list unless told not to (hub_utils._get_checkpoint_shard_files: model_info), which
    # fails offline even with every shard cached (FLUX.1-dev's transformer is sharded)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **hub_kwargs(), **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise FileNotFoundError(
            f"could not load {subfolder}/ of {path!r} (config key `policy.pretrained`): {err}"
        ) from err


def set_attention_backend(transformer, backend: str, device: torch.device) -> str:
    """``flash`` through diffusers' attention dispatcher when on CUDA and flash-attn is installed;
    otherwise SDPA (diffusers' default), with a warning when flash was asked for."""
    if backend != "flash":
        return "sdpa"
    if device.type != "cuda":
        warnings.warn("policy.attention_backend = 'flash' needs CUDA; using SDPA", stacklevel=2)
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        warnings.warn(
            "policy.attention_backend = 'flash' but flash-attn is not installed "
            "(pip install 'fastcps[flash]'); using SDPA",
            stacklevel=2,
        )
        return "sdpa"
    transformer.set_attention_backend("flash")
    return "flash"


class DiffusersPolicy(Policy):
    """What FLUX and SD3 share: frozen text encoders/VAE, offloading, base reference for full FT."""

    transformer_cls = None
    pipeline_cls = None
    vae_cls = None  # None: diffusers' AutoencoderKL (FLUX, SD3)
    subfolders: tuple[str, ...] = ()
    text_encoder_names: tuple[str, ...] = ()
    t5_tokenizer_name = "tokenizer_2"  # the pipeline attribute of the T5 tokenizer

    @classmethod
    def files(cls, cfg) -> list:
        """What ``policy.pretrained`` needs (``python -m fastcps.fetch``, the trainer's start-up check): of
        a hub id, the subfolders this class loads and model_index.json, not the rest of the repo (FLUX.1-dev's
        root holds the 23.8 GB single-file flux1-dev.safetensors, which diffusers' subfolders duplicate); a
        local folder must exist."""
        from fastcps.fetch.items import HubRepo, LocalPath

        what = f"{cls.family} pipeline: {', '.join(cls.subfolders)}"
        if not is_hub_id(cfg.pretrained):
            return [LocalPath(cfg.pretrained, "policy.pretrained", what)]
        return [
            HubRepo(
                cfg.pretrained,
                "policy.pretrained",
                what,
                allow_patterns=("model_index.json", *(f"{s}/*" for s in cls.subfolders)),
                required=tuple(f"{s}/{_config_file(s)}" for s in cls.subfolders),
                weights=tuple(s for s in cls.subfolders if _config_file(s) == "config.json"),
            )
        ]

    def _load_common(self, cfg, device, zero_stage: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        from fastcps.policies import DTYPES

        self.dtype = DTYPES[cfg.dtype]
        self.path = resolve_pretrained(cfg.pretrained, self.family, self.example, self.subfolders)
        self.transformer = load_component(
            self.transformer_cls, self.path, "transformer", torch_dtype=self.dtype
        )
        # ZeRO-3: the transformer stays on the CPU (FLUX.1-dev: 22 GiB in bf16, all of a 24 GB card);
        # the trainer partitions it onto the device tensor by tensor (fastcps.engine.partition_zero3).
        # Otherwise every rank keeps the whole model on its device anyway: move it now. Module.to moves
        # tensor by tensor and drops each CPU copy as it goes, so the device never holds two copies.
        self.deferred_placement = zero_stage == 3
        if self.deferred_placement:
            # buffers (SD3's positional table) are never partitioned, and DeepSpeed's engine skips its
            # module.to(device) for a partitioned model: they go to the device here
            for m in self.transformer.modules():
                for name, b in m._buffers.items():
                    if b is not None:
                        m._buffers[name] = b.to(self.device)
        else:
            self.transformer.to(self.device)
        self.transformer.train()
        if (
            cfg.gradient_checkpointing is True
        ):  # "auto" is resolved by the trainer (fastcps.plan.resolve_auto)
            self.transformer.enable_gradient_checkpointing()
        self.attention_backend = set_attention_backend(self.transformer, cfg.attention_backend, self.device)
        if self.vae_cls is None:
            from diffusers import AutoencoderKL

            self.vae_cls = AutoencoderKL
        self.vae = load_component(self.vae_cls, self.path, "vae", torch_dtype=torch.float32)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.vae_scale_factor = self._vae_scale_factor()
        res = int(cfg.resolution)
        if res % (2 * self.vae_scale_factor):
            raise ValueError(
                f"policy.resolution = {res} must be a multiple of {2 * self.vae_scale_factor} "
                f"for {self.family} (VAE x{self.vae_scale_factor}, 2x2 patches)"
            )
        self.resolution = res
        self._base = None

    def text_token_counts(self, prompts: list[str]) -> list[int]:
        """T5 tokens per prompt, end-of-sequence included, as ``encode_prompt`` counts them before it
        cuts at ``max_sequence_length`` (CLIP's fixed 77 only feeds the pooled vector)."""
        tokenizer = getattr(self.pipe, self.t5_tokenizer_name)
        return [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in self.text_encoder_names]

    @contextlib.contextmanager
    def _encoders_on_device(self):
        if self.cfg.offload_frozen:
            for m in self._text_encoders():
                m.to(self.device)
        try:
            yield
        finally:
            if self.cfg.offload_frozen:
                for m in self._text_encoders():
                    m.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _frozen_text_encoder(self, cls, subfolder: str):
        m = load_component(cls, self.path, subfolder, torch_dtype=self.dtype)
        return m.to("cpu" if self.cfg.offload_frozen else self.device).eval().requires_grad_(False)

    def _vae_scale_factor(self) -> int:
        """Pixels per latent cell: AutoencoderKL halves the side at every block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _vae_input(self, z: torch.Tensor) -> torch.Tensor:
        """The model's latents (fp32) as the VAE decodes them: AutoencoderKL's scaling and shift."""
        return z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)

    #: images per VAE decode call: bounds the decoder's full-resolution activations (128 channels at
    #: 512x512 is 128 MiB per tensor per image in fp32, several alive at once: a chunk of 4 peaks at
    #: 3.0 GiB with the fp32 weights, 1.5 GiB in bf16; ``fastcps.plan.measure.vae_decode_peak``)
    decode_chunk = 4

    @torch.no_grad()
    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] holding exactly the 8-bit levels k/255 a saved image holds: the anchors score
        ``(images * 255).round().clamp(0, 255).to(torch.uint8)`` of the fp32 decode (flow_grpo
        flow_grpo/rewards.py, every reward), and a PNG of these images is what the rewards saw."""
        z = self._vae_input(z.float())
        out = []
        for part in z.split(self.decode_chunk):
            img = self.vae.decode(part.to(self.device, self.vae.dtype), return_dict=False)[0]
            if img.dim() == 5:  # a video VAE (Qwen-Image's): (B, C, frames, H, W), one frame
                img = img[:, :, 0]
            img = (img.float() * 0.5 + 0.5).clamp(0.0, 1.0)  # VaeImageProcessor.denormalize
            out.append((img * 255).round() / 255)
        return torch.cat(out)

    @contextlib.contextmanager
    def reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """LoRA: ``model`` with adapters off. Full fine-tuning: the base transformer, loaded again
        (frozen, outside DeepSpeed) on first use: only runs with ``train.beta_kl > 0`` pay for it."""
        if self.lora:
            with super().reference(model) as base:
                yield base
            return
        if self._base is None:
            self._base = load_component(
                self.transformer_cls, self.path, "transformer", torch_dtype=self.dtype
            )
            self._base.to(self.device).eval().requires_grad_(False)
            if self.attention_backend == "flash":
                self._base.set_attention_backend("flash")
        yield self._base


class FluxPolicy(DiffusersPolicy):
    family = "FLUX"
    example = "black-forest-labs/FLUX.1-dev"
    subfolders = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, cfg, device="cpu", zero_stage: int = 0):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.transformer_cls = FluxTransformer2DModel
        self._load_common(cfg, device, zero_stage)
        tc = self.transformer.config
        if tc.guidance_embeds:
            self.guidance = 3.5 if cfg.guidance is None else float(cfg.guidance)
        else:
            if cfg.guidance is not None:
                raise ValueError(
                    f"policy.guidance = {cfg.guidance}, but {self.path} has no guidance embedding "
                    "(FLUX.1-schnell is not guidance-distilled): set policy.guidance to null"
                )
            self.guidance = None
        self.pipe = FluxPipeline(
            scheduler=load_component(FlowMatchEulerDiscreteScheduler, self.path, "scheduler"),
            vae=self.vae,
            text_encoder=self._frozen_text_encoder(CLIPTextModel, "text_encoder"),
            tokenizer=load_component(CLIPTokenizer, self.path, "tokenizer"),
            text_encoder_2=self._frozen_text_encoder(T5EncoderModel, "text_encoder_2"),
            tokenizer_2=load_component(T5TokenizerFast, self.path, "tokenizer_2"),
            transformer=None,  # ours trains under DeepSpeed; the pipeline only encodes prompts
        )
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.max_sequence_length = int(cfg.max_sequence_length)
        lat = self.resolution // self.vae_scale_factor  # 64 at 512 px
        self.latent_hw = lat
        self.num_tokens = (lat // 2) ** 2
        self.channels = tc.in_channels  # 64 = 16 latent channels x 2 x 2
        self.img_ids = FluxPipeline._prepare_latent_image_ids(
            1, lat // 2, lat // 2, self.device, torch.float32
        )
        self.txt_ids = torch.zeros(self.max_sequence_length, 3, device=self.device)
        self._sigma_cache: dict[int, torch.Tensor] = {}

    # --- Policy interface -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
        with self._encoders_on_device():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def latent_shape(self) -> tuple[int, ...]:
        return (self.num_tokens, self.channels)

    def sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        if num_steps not in self._sigma_cache:
            self._sigma_cache[num_steps] = pipeline_sigmas(self.scheduler_config, self.num_tokens, num_steps)
        return self._sigma_cache[num_steps].to(device or self.device)

    def velocity(
        self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        b = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape():
            raise ValueError(
                f"FLUX latents must be [B, {self.num_tokens}, {self.channels}] (packed at "
                f"{self.resolution} px), got {tuple(latents.shape)}"
            )
        sigma, hidden, pooled = self.batch_inputs(latents, sigma, cond)
        dev, dtype = latents.device, self.dtype
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), self.guidance, device=dev, dtype=torch.float32)
        tokens, img_ids = self._image_tokens(latents.to(dtype), cond)
        out = model(
            hidden_states=tokens,
            # FluxPipeline: t = 1000·σ cast to the latents' dtype, then t / 1000 (the transformer multiplies
            # by 1000 itself): in bf16 the embedding sees bf16(bf16(1000·σ) / 1000) · 1000, not 1000·σ
            timestep=(sigma * 1000.0).to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled.to(dev, dtype),
            encoder_hidden_states=hidden.to(dev, dtype),
            txt_ids=self.txt_ids[: hidden.shape[1]].to(dev),
            img_ids=img_ids.to(dev),
            return_dict=False,
        )[0]
        # the target's tokens come first; an editing subclass's reference tokens after them are dropped
        return out[:, : latents.shape[1]].float()

    def _image_tokens(self, latents: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(the transformer's image tokens, their RoPE ids): FLUX's are the target's alone; FLUX.1 Kontext
        appends the source image's (``fastcps.policies.kontext``)."""
        return latents, self.img_ids

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        z = FluxPipeline._unpack_latents(
            latents.float(), self.resolution, self.resolution, self.vae_scale_factor
        )
        return self._vae_decode(z)
