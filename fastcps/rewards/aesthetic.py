"""``aesthetic``: the LAION "improved aesthetic predictor" (CLIP ViT-L/14 image embedding + MLP head).

score = MLP(image_embedding / ||image_embedding||), on the LAION scale (roughly 1-10; SD images ≈ 5-6),
as DDPO / Flow-GRPO compute it. The CLIP model is a transformers ``CLIPModel`` (default
``openai/clip-vit-large-patch14``), the head a state dict (``sac+logos+ava1-l14-linearMSE.pth`` from
christophschuhmann/improved-aesthetic-predictor, keys ``layers.{0,2,4,6,7}.{weight,bias}``) whose layer
sizes are read from the file, so any width works.

Precision: float32 by default, as the RL anchors score (none runs it in bf16): flow_grpo
``flow_grpo/rewards.py`` ``aesthetic_score``: ``AestheticScorer(dtype=torch.float32)`` (its
``flow_grpo/aesthetic_scorer.py`` feeds the CLIP inputs in that dtype, no autocast). Its images are
``(images * 255).round()``'s uint8 levels through the CLIP processor of transformers 4.40 (PIL resize):
so are ours (``_util.hf_pixel_values``). The head always runs
in fp32 on the fp32 normalised embedding. ``dtype`` (float16 | bfloat16 | amp) applies to the CLIP model.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcps.rewards import DType, RewardArgs
from fastcps.rewards._util import (
    autocast,
    batches,
    check_inputs,
    from_pretrained,
    hf_pixel_values,
    resolve_device,
    resolve_dtype,
    resolve_weights,
)
from fastcps.rewards.pickscore import clip_embed_images

__all__ = ["AestheticHead", "AestheticReward"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticHead(nn.Module):
    """Linear(d, 1024) Drop Linear(1024, 128) Drop Linear(128, 64) Drop Linear(64, 16) Linear(16, 1)."""

    def __init__(self, dims=(768, 1024, 128, 64, 16, 1)):
        super().__init__()
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]),
            nn.Dropout(0.2),
            nn.Linear(d[1], d[2]),
            nn.Dropout(0.2),
            nn.Linear(d[2], d[3]),
            nn.Dropout(0.1),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, sd: dict) -> AestheticHead:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        try:
            w = [sd[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
        except KeyError as err:
            raise ValueError(
                f"reward 'aesthetic': head state dict lacks {err} (expected keys "
                "layers.{0,2,4,6,7}.weight/bias)"
            ) from err
        head = cls([w[0].shape[1]] + [x.shape[0] for x in w])
        head.load_state_dict(sd, strict=True)
        return head


class AestheticReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` (fp32; prompts unused).

    Args (config ``rewards[].args``): ``head`` (path to the MLP state dict, .pth/.pt/.safetensors;
    required), ``model`` / ``processor`` (CLIPModel / CLIPProcessor path or hub id,
    ``openai/clip-vit-large-patch14``), ``device`` (None = the images'), ``dtype`` (float32, the anchors'
    precision; float16 | bfloat16 | amp for the CLIP model),
    ``batch_size`` (16).
    """

    name = "aesthetic"

    class Args(RewardArgs):
        head: str | None = None
        """Path of the MLP head's state dict (.pth/.pt/.safetensors); required."""
        model: str = DEFAULT_CLIP
        """CLIPModel path or hub id."""
        processor: str | None = None
        """CLIPProcessor path or hub id; None = `model`."""
        device: str | None = None
        """None = the images' device."""
        dtype: DType = "float32"
        """float32 (the anchors' precision) | float16 | bfloat16 | amp for the CLIP model."""
        batch_size: int = 16
        """Images per forward."""

    def __init__(
        self,
        head: str | None = None,
        model: str = DEFAULT_CLIP,
        processor: str | None = None,
        device=None,
        dtype: str | None = "float32",
        batch_size: int = 16,
    ):
        self.head_path, self.model_id, self.processor_id = head, model, processor or model
        self.device, self.dtype, self.batch_size = device, dtype, int(batch_size)
        self._clip = self._head = self._processor = None

    @classmethod
    def files(cls, args: dict) -> list:
        """The head (a local file) and the CLIP model / processor (hub repos or local paths)."""
        from fastcps.fetch.items import (
            IMAGE_PROCESSOR,
            LocalPath,
            local_or_hub,
            transformers_model,
            transformers_processor,
        )

        a = cls.Args.model_validate(args)
        both = a.processor in (None, a.model)  # the processor's files come with the model's repo
        items = [
            LocalPath(a.head or "", "head", "aesthetic MLP head"),
            local_or_hub(
                a.model,
                "model",
                "CLIP model" + (" and image processor" if both else ""),
                lambda *r: transformers_model(*r, *((IMAGE_PROCESSOR,) if both else ())),
            ),
        ]
        if not both:
            items.append(
                local_or_hub(
                    a.processor,
                    "processor",
                    "CLIP image processor",
                    lambda *r: transformers_processor(*r, IMAGE_PROCESSOR),
                )
            )
        return items

    def load(self, device) -> None:
        """Load the models now (on ``device`` unless the reward's own ``device`` is set), not at the first
        call."""
        self._load(torch.device(self.device if self.device is not None else device))

    def _load(self, device: torch.device):
        if self._clip is None:
            from transformers import CLIPImageProcessor, CLIPModel

            head_path, _ = resolve_weights(self.name, "head", self.head_path)
            if not str(head_path).endswith((".pth", ".pt", ".safetensors", ".bin")):
                raise ValueError(
                    f"reward 'aesthetic': config key rewards[].args.head must be a local "
                    f".pth/.pt/.safetensors file, got {head_path!r}"
                )
            proc, _ = resolve_weights(self.name, "processor", self.processor_id)
            mdl, _ = resolve_weights(self.name, "model", self.model_id)
            if head_path.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(head_path)
            else:
                sd = torch.load(head_path, map_location="cpu", weights_only=True)
            head = AestheticHead.from_state_dict(sd)
            self._processor = from_pretrained(self.name, "processor", CLIPImageProcessor, proc)
            clip = from_pretrained(self.name, "model", CLIPModel, mdl)
            dt = resolve_dtype(self.name, self.dtype, device)
            self._clip = clip.to(device=device, dtype=dt).eval().requires_grad_(False)
            self._head = head.to(device=device).eval().requires_grad_(False)
        elif next(self._clip.parameters()).device != device:
            self._clip, self._head = self._clip.to(device), self._head.to(device)
        return self._clip, self._head, self._processor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None, metadata=None):
        if prompts is None:
            prompts = [""] * images.shape[0]
        check_inputs(self.name, images, prompts, metadata)
        device = resolve_device(self.device, images)
        clip, head, processor = self._load(device)
        dt = next(clip.parameters()).dtype
        out = []
        for sl in batches(images.shape[0], self.batch_size):
            pix = hf_pixel_values(processor, images[sl])
            with autocast(self.dtype, device):
                emb = clip_embed_images(clip, pix.to(device, dt)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            out.append(head(emb)[:, 0])
        return torch.cat(out).float().to(images.device)
