"""``hpsv2``: Human Preference Score v2(.1) (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPD v2.

score = cos(text_embedding, image_embedding) (the paper: 0.304 → 0.377 with CPS), as in ``hpsv2``'s
``img_score.py``: the whole CLIP state dict comes from the HPS checkpoint (``checkpoint["state_dict"]``),
so the LAION base weights are not needed. Images [B, 3, H, W] in [0, 1] are scored as the authors' and
flow_grpo's scorers score a saved image: their 8-bit levels as PIL images through open_clip's eval
transform (PIL bicubic resize of the short side to the model's image size, center crop, OpenAI CLIP
mean/std; ``_util.open_clip_pixel_values``, on the CPU); texts use open_clip's tokenizer (BPE vocabulary
shipped in its wheel).

Precision: ``dtype="amp"`` by default, as the authors score: fp32 weights and the forward under fp16
autocast (tgxs002/HPSv2 ``hpsv2/img_score.py``: ``create_model_and_transforms(..., precision='amp')``,
which keeps fp32 weights, ``hpsv2/src/open_clip/factory.py`` casting only for 'fp16'/'bf16', then
``with torch.cuda.amp.autocast():`` around the model; DanceGRPO ``fastvideo/train_grpo_flux.py`` the
same, ``precision='amp'`` and ``with torch.amp.autocast('cuda')``; flow_grpo ``flow_grpo/hpsv2_scorer.py``
(yifan123/flow_grpo at 94e23ee) the same). Nobody runs it in bf16. On the CPU ``amp`` is plain fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pydantic import Field

from fastcps.rewards import DType, RewardArgs
from fastcps.rewards._util import (
    autocast,
    batches,
    check_inputs,
    hub_kwargs,
    hub_load_error,
    open_clip_pixel_values,
    resolve_device,
    resolve_dtype,
    resolve_weights,
)

__all__ = ["HPSv2Reward", "load_state_dict"]

DEFAULT_CHECKPOINT = "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_state_dict(path: str, trust_checkpoint: bool = False) -> dict:
    """State dict of an HPS checkpoint (``.pt``/``.pth`` with or without a ``state_dict`` entry, or
    ``.safetensors``); ``module.`` prefixes (DDP) are stripped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=not trust_checkpoint)
        except Exception as err:  # pickle with non-tensor objects
            if trust_checkpoint:
                raise
            raise RuntimeError(
                f"reward 'hpsv2': {path!r} cannot be loaded with torch.load(weights_only=True) ({err}); "
                "if you trust the file set config key rewards[].args.trust_checkpoint: true"
            ) from err
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


class HPSv2Reward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` cosine in [-1, 1] (fp32).

    Args (config ``rewards[].args``):
      ``checkpoint``: HPS v2.1 checkpoint: a local ``.pt``/``.safetensors`` path or
        ``hf-hub:<org>/<repo>/<file>`` (default ``hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt``; offline
        with ``HF_HUB_OFFLINE=1`` only from the local cache).
      ``model_name``: open_clip architecture ("ViT-H-14").
      ``model_config``: optional open_clip model config (dict or .json path with ``embed_dim``,
        ``vision_cfg``, ``text_cfg``) instead of ``model_name`` (tests use a tiny one).
      ``device``: None = the images' device.  ``dtype``: amp | float32 | float16 | bfloat16 (amp: fp32
        weights, fp16 autocast on CUDA, the authors' precision; see the module docstring).
      ``batch_size``: images per forward (16).  ``trust_checkpoint``: allow full unpickling (False).
    """

    name = "hpsv2"

    class Args(RewardArgs):
        checkpoint: str = DEFAULT_CHECKPOINT
        """A local .pt/.safetensors path or hf-hub:<org>/<repo>/<file>."""
        model_name: str = "ViT-H-14"
        """open_clip architecture."""
        # ``model_config`` is pydantic's own attribute: the field takes another name, the key stays.
        open_clip_config: dict | str | None = Field(None, alias="model_config")
        """open_clip model config (dict or .json path) instead of `model_name`."""
        device: str | None = None
        """None = the images' device."""
        dtype: DType = "amp"
        """amp (fp32 weights, fp16 autocast on CUDA) | float32 | float16 | bfloat16."""
        batch_size: int = 16
        """Images per forward."""
        trust_checkpoint: bool = False
        """Allow full unpickling of the checkpoint."""

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        model_name: str = "ViT-H-14",
        model_config: dict | str | None = None,
        device=None,
        dtype: str | None = "amp",
        batch_size: int = 16,
        trust_checkpoint: bool = False,
    ):
        self.checkpoint, self.model_name, self.model_config = checkpoint, model_name, model_config
        self.device, self.dtype, self.batch_size = device, dtype, int(batch_size)
        self.trust_checkpoint = bool(trust_checkpoint)
        self._model = self._tokenizer = None
        self.image_size = 224

    @classmethod
    def files(cls, args: dict) -> list:
        """The checkpoint (``hf-hub:<org>/<repo>/<file>``: that one file; else a local path), a model
        config file, and an ``hf-hub:`` open_clip architecture's config. open_clip's built-in ``ViT-H-14``
        needs nothing else (``pretrained=None``; its BPE vocabulary ships in the wheel)."""
        from fastcps.fetch.items import HubRepo, LocalPath, hub_file

        a = cls.Args.model_validate(args)
        ck = str(a.checkpoint)
        items = []
        if ck.startswith("hf-hub:"):
            repo, _, fname = ck[len("hf-hub:") :].rpartition("/")
            if not repo or "/" not in repo:
                raise ValueError(
                    f"reward 'hpsv2': config key rewards[].args.checkpoint {ck!r} must be "
                    "'hf-hub:<org>/<repo>/<file>' or a local path"
                )
            items.append(hub_file(repo, fname, "checkpoint", "HPS v2 checkpoint"))
        else:
            items.append(LocalPath(ck, "checkpoint", "HPS v2 checkpoint"))
        if isinstance(a.open_clip_config, str):
            items.append(LocalPath(a.open_clip_config, "model_config", "open_clip model config"))
        elif a.open_clip_config is None and a.model_name.startswith("hf-hub:"):
            repo = a.model_name[len("hf-hub:") :]
            items.append(
                HubRepo(
                    repo,
                    "model_name",
                    "open_clip config and tokenizer",
                    allow_patterns=("*.json", "*.txt"),
                    required=("open_clip_config.json",),
                )
            )
        return items

    def load(self, device) -> None:
        """Load the model now (on ``device`` unless the reward's own ``device`` is set), not at the first
        call."""
        self._load(torch.device(self.device if self.device is not None else device))

    def _checkpoint_path(self) -> str:
        ck = str(self.checkpoint) if self.checkpoint is not None else ""
        if ck.startswith("hf-hub:"):
            repo_file = ck[len("hf-hub:") :]
            repo, _, fname = repo_file.rpartition("/")
            if not repo or "/" not in repo:
                raise ValueError(
                    f"reward 'hpsv2': config key rewards[].args.checkpoint {ck!r} must be "
                    "'hf-hub:<org>/<repo>/<file>' or a local path"
                )
            try:
                from huggingface_hub import hf_hub_download

                return hf_hub_download(repo, fname, **hub_kwargs())
            except Exception as err:
                raise hub_load_error(self.name, "checkpoint", ck, err) from err
        path, _ = resolve_weights(self.name, "checkpoint", ck or None)
        if Path(path).is_dir():
            raise FileNotFoundError(
                f"reward 'hpsv2': config key rewards[].args.checkpoint {path!r} is a "
                "directory; give the checkpoint file"
            )
        return path

    def _build(self):
        import open_clip

        cfg = self.model_config
        if cfg is None:
            model = open_clip.create_model(self.model_name, pretrained=None)
            tokenizer = open_clip.get_tokenizer(self.model_name)
            self.image_size = int(open_clip.get_model_config(self.model_name)["vision_cfg"]["image_size"])
            return model, tokenizer
        if not isinstance(cfg, dict):
            p = Path(cfg)
            if not p.is_file():
                raise FileNotFoundError(
                    f"reward 'hpsv2': model config not found at {str(cfg)!r} "
                    "(config key rewards[].args.model_config)"
                )
            cfg = json.loads(p.read_text())
        cfg = dict(cfg)
        model = open_clip.CLIP(**cfg)
        ctx = int(cfg.get("text_cfg", {}).get("context_length", 77))
        tokenizer = open_clip.SimpleTokenizer(context_length=ctx)
        self.image_size = int(cfg.get("vision_cfg", {}).get("image_size", 224))
        return model, tokenizer

    def _load(self, device: torch.device):
        if self._model is None:
            path = self._checkpoint_path()
            model, self._tokenizer = self._build()
            sd = load_state_dict(path, self.trust_checkpoint)
            try:
                missing, unexpected = model.load_state_dict(sd, strict=False)
            except RuntimeError as err:
                raise RuntimeError(
                    f"reward 'hpsv2': checkpoint {path!r} does not fit the model "
                    f"(config keys rewards[].args.model_name / model_config): {err}"
                ) from err
            missing = [k for k in missing if not k.endswith("attn_mask")]
            if missing or unexpected:
                raise RuntimeError(
                    f"reward 'hpsv2': checkpoint {path!r} does not fit the model "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            dt = resolve_dtype(self.name, self.dtype, device)
            self._model = model.to(device=device, dtype=dt).eval().requires_grad_(False)
        elif next(self._model.parameters()).device != device:
            self._model = self._model.to(device)
        return self._model, self._tokenizer

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        check_inputs(self.name, images, prompts, metadata)
        device = resolve_device(self.device, images)
        model, tokenizer = self._load(device)
        dt = next(model.parameters()).dtype
        mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_STD
        out = []
        for sl in batches(images.shape[0], self.batch_size):
            pix = open_clip_pixel_values(images[sl], self.image_size, mean, std).to(device, dt)
            text = tokenizer(list(prompts[sl])).to(device)
            with autocast(self.dtype, device):
                img = model.encode_image(pix, normalize=True).float()
                txt = model.encode_text(text, normalize=True).float()
            out.append((img * txt).sum(-1))
        return torch.cat(out).to(images.device)
