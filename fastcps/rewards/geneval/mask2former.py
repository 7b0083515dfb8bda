"""GenEval's object detector in process: Mask2Former COCO instance segmentation through transformers
(``Mask2FormerForUniversalSegmentation``, default ``facebook/mask2former-swin-small-coco-instance``: Swin-S,
the backbone of GenEval's mmdetection ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``).

GenEval calls mmdetection 2.x's ``inference_detector(object_detector, filepath)`` and reads ``bbox, segm =
result``: per class, rows ``[x1, y1, x2, y2, score]`` and binary masks at the image's size. We compute the
same from the transformers model's raw outputs, following mmdetection 2.x step by step:

- preprocessing, the config's test pipeline (``configs/mask2former/mask2former_r50_lsj_8x2_50e_coco
  -panoptic.py``, which the Swin-S COCO config inherits): ``MultiScaleFlipAug(img_scale=(1333, 800))``,
  ``Resize(keep_ratio=True)`` (mmcv ``imrescale``, cv2 bilinear on uint8: scale ``min(1333 / long side, 800
  / short side)``, sizes ``int(x * scale + 0.5)``), ``Normalize(mean=[123.675, 116.28, 103.53], std=[58.395,
  57.12, 57.375], to_rgb=True)``, ``Pad(size_divisor=32)`` with zeros after normalising. transformers'
  ``Mask2FormerImageProcessor`` does otherwise: the hub checkpoint's processor squashes every image to
  384x384 and its resize rounds sizes *up* to a multiple of 32 instead of padding, so it is not used.
- ``Mask2FormerHead.simple_test``: mask logits ``F.interpolate(..., size=batch_input_shape, mode='bilinear',
  align_corners=False)``; ``MaskFormerFusionHead.simple_test``: ``mask_pred_result[:, :img_height,
  :img_width]`` (padding off), then with ``rescale`` ``F.interpolate(..., size=(ori_height, ori_width),
  mode='bilinear', align_corners=False)``.
- ``MaskFormerFusionHead.instance_postprocess``: ``scores = F.softmax(mask_cls, dim=-1)[:, :-1]``; the top
  ``max_per_image`` (100) of ``scores.flatten(0, 1)``, labels ``index % num_classes``, queries ``index //
  num_classes``; ``mask_pred_binary = (mask_pred > 0)``; ``mask_scores_per_image = (mask_pred.sigmoid() *
  mask_pred_binary).flatten(1).sum(1) / (mask_pred_binary.flatten(1).sum(1) + 1e-6)``; ``det_scores =
  scores_per_image * mask_scores_per_image``; ``bboxes = mask2bbox(mask_pred_binary)`` (``[x[0], y[0],
  x[-1] + 1, y[-1] + 1]`` of the mask's columns and rows, zeros for an empty mask).
- ``MaskFormer.simple_test``: ``bbox2result`` / ``mask_results[label].append(mask)``, one list per class;
  GenEval names class ``index`` ``classnames[index]`` (its ``evaluation/object_names.txt``):
  ``OBJECT_NAMES``.

Only the masks that can pass GenEval's threshold are upsampled: a detection's score is its class score
times its mask score, and the mask score is below 1 (a mean of sigmoids), so a pair whose class score is at
most the threshold never passes ``> threshold``; skipping it changes nothing and saves upsampling ~100
masks to the image's size.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from fastcps.rewards._util import (
    autocast,
    batches,
    from_pretrained,
    resolve_device,
    resolve_dtype,
    resolve_weights,
    to_uint8,
)
from fastcps.rewards.geneval.rules import Detection

__all__ = [
    "DEFAULT_MODEL",
    "OBJECT_NAMES",
    "Mask2FormerDetector",
    "check_labels",
    "instance_postprocess",
    "mask2bbox",
    "preprocess",
    "rescale_size",
]

logger = logging.getLogger("fastcps.rewards.geneval")

DEFAULT_MODEL = "facebook/mask2former-swin-small-coco-instance"
# mmdetection's test scale img_scale=(1333, 800): the short side at most 800, the long side at most 1333
DETECT_SIZE = (800, 1333)
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)
MAX_PER_IMAGE = 100  # mmdetection's Mask2Former test_cfg max_per_image=100

# GenEval evaluation/object_names.txt, line i = COCO class i (mmdetection's order, 80 "thing" classes)
OBJECT_NAMES = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, "
    "stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, "
    "backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, "
    "baseball glove, skateboard, surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, "
    "bowl, banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, "
    "potted plant, bed, dining table, toilet, tv, laptop, computer mouse, tv remote, computer keyboard, "
    "cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear, "
    "hair drier, toothbrush"
).split(", ")
# COCO's own names (detectron2's and mmdetection's CLASSES) where GenEval renamed the class
COCO_RENAMED = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def check_labels(id2label: dict, key: str = "rewards[].args.model") -> None:
    """The model must classify GenEval's 80 COCO classes in COCO's order: GenEval maps class index i to
    ``object_names.txt`` line i. Names ``LABEL_i`` (a config without names) pass; named classes must be
    GenEval's (or COCO's name GenEval renamed)."""
    if len(id2label) != len(OBJECT_NAMES):
        raise ValueError(
            f"reward 'geneval': the Mask2Former model ({key}) has {len(id2label)} classes; GenEval needs a "
            f"COCO instance-segmentation model with its {len(OBJECT_NAMES)} classes "
            f"(e.g. {DEFAULT_MODEL}, not a panoptic one)"
        )
    bad = []
    for i, want in enumerate(OBJECT_NAMES):
        name = str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))).strip().lower().replace("_", " ")
        if name != f"label {i}" and COCO_RENAMED.get(name, name) != want:
            bad.append(f"{i}: {name!r} (GenEval: {want!r})")
    if bad:
        raise ValueError(
            f"reward 'geneval': the Mask2Former model ({key}) names its classes in another order than "
            f"COCO's, which GenEval's object_names.txt follows: {', '.join(bad[:5])}"
        )


def rescale_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """mmcv ``rescale_size`` with scale (long, short): ``scale_factor = min(max_long_edge / max(h, w),
    max_short_edge / min(h, w))``, ``int(w * scale + 0.5), int(h * scale + 0.5)``."""
    scale = min(long / max(h, w), short / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess(images: torch.Tensor, detect_size=DETECT_SIZE):
    """Images [B,3,H,W] in [0,1] -> (pixel values [B,3,Hp,Wp] fp32, resized (h, w), padded (Hp, Wp)), as
    mmdetection's test pipeline makes them (module doc): the 8-bit levels resized bilinearly (cv2's
    INTER_LINEAR maps pixel centres as ``align_corners=False`` and returns uint8, hence the rounding),
    normalised, zero-padded at the bottom and right to multiples of 32."""
    x = to_uint8(images).float()
    h, w = rescale_size(x.shape[-2], x.shape[-1], *detect_size)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    mean = torch.tensor(MMDET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(MMDET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    hp, wp = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    return F.pad(x, (0, wp - w, 0, hp - h)), (h, w), (hp, wp)


def mask2bbox(masks: torch.Tensor) -> torch.Tensor:
    """mmdetection's ``mask2bbox``: bool [N,H,W] -> [N,4] float ``x1, y1, x2, y2`` with x2, y2 one past the
    last column / row of the mask; zeros for an empty mask. Vectorised (mmdetection loops)."""
    n, h, w = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # [N, W], [N, H]
    xs = torch.arange(w, device=masks.device).expand(n, w)
    ys = torch.arange(h, device=masks.device).expand(n, h)
    x1 = torch.where(cols, xs, w).amin(1)
    x2 = torch.where(cols, xs, -1).amax(1) + 1
    y1 = torch.where(rows, ys, h).amin(1)
    y2 = torch.where(rows, ys, -1).amax(1) + 1
    box = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where((cols.any(1) & rows.any(1))[:, None], box, torch.zeros_like(box))


def instance_postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized: tuple[int, int],
    padded: tuple[int, int],
    original: tuple[int, int],
    min_scores: torch.Tensor,
    max_per_image: int = MAX_PER_IMAGE,
) -> dict[str, torch.Tensor]:
    """mmdetection 2.x's instance results (module doc) of a batch scored above ``min_scores[b]``: only the
    (class, query) pairs whose class score exceeds it are upsampled (the rest cannot pass; module doc).

    ``class_logits`` [B,Q,C+1] (last = no object), ``mask_logits`` [B,Q,h,w] at the model's mask stride;
    returns flat tensors over the kept detections: ``image`` (batch index), ``label`` (class index),
    ``score`` (class x mask score), ``box`` [N,4] in pixels of the ``original`` (H, W), ``mask`` bool
    [N,H,W]."""
    b, q, c1 = class_logits.shape
    c = c1 - 1
    scores = class_logits.float().softmax(-1)[..., :-1].flatten(1)  # [B, Q*C], query-major as mmdetection
    top, index = scores.topk(min(max_per_image, q * c), dim=1, sorted=False)
    img, pos = torch.nonzero(top > min_scores.to(top.device)[:, None], as_tuple=True)
    label, query, cls_score = index[img, pos] % c, index[img, pos] // c, top[img, pos]
    h, w = original
    if img.numel() == 0:
        empty = torch.zeros(0, device=top.device)
        return {
            "image": img,
            "label": label,
            "score": empty,
            "box": empty.view(0, 4),
            "mask": torch.zeros(0, h, w, dtype=torch.bool, device=top.device),
        }
    m = mask_logits[img, query].float()[:, None]  # [N, 1, h/4, w/4]
    m = F.interpolate(m, size=padded, mode="bilinear", align_corners=False)[..., : resized[0], : resized[1]]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    binary = m > 0
    mask_score = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    score = cls_score * mask_score
    keep = score > min_scores.to(score.device)[img]
    binary = binary[keep]
    return {
        "image": img[keep],
        "label": label[keep],
        "score": score[keep],
        "box": mask2bbox(binary),
        "mask": binary,
    }


class Mask2FormerDetector:
    """``detect(images [B,3,H,W] in [0,1], min_scores) -> list[list[Detection]]`` with masks (on the
    model's device) for the colour crops; ``min_scores[b]``: detections scored at most this are left out
    (GenEval's threshold of image b)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device=None,
        dtype: str | None = "float32",
        batch_size: int = 8,
        detect_size=DETECT_SIZE,
    ):
        short, long = (int(v) for v in detect_size)
        if not 0 < short <= long:
            raise ValueError(
                "reward 'geneval': config key rewards[].args.detect_size must be [short, long] with "
                f"0 < short <= long (mmdetection's [800, 1333]), got {list(detect_size)}"
            )
        self.model_id, self.device, self.dtype = model, device, dtype
        self.batch_size, self.detect_size = int(batch_size), (short, long)
        self._model = None

    def load(self, device) -> None:
        self._load(torch.device(self.device if self.device is not None else device))

    def _load(self, device: torch.device):
        if self._model is None:
            from transformers import Mask2FormerForUniversalSegmentation

            path, _ = resolve_weights("geneval", "model", self.model_id)
            model = from_pretrained("geneval", "model", Mask2FormerForUniversalSegmentation, path)
            check_labels(model.config.id2label)
            dt = resolve_dtype("geneval", self.dtype, device)
            self._model = model.to(device=device, dtype=dt).eval().requires_grad_(False)
            logger.info("geneval: Mask2Former %s on %s (%s)", self.model_id, device, dt)
        elif next(self._model.parameters()).device != device:
            self._model = self._model.to(device)
        return self._model

    @torch.no_grad()
    def detect(self, images: torch.Tensor, min_scores) -> list[list[Detection]]:
        device = resolve_device(self.device, images)
        model = self._load(device)
        dt = next(model.parameters()).dtype
        floors = torch.as_tensor(min_scores, dtype=torch.float32)
        out: list[list[Detection]] = []
        for sl in batches(images.shape[0], self.batch_size):
            x = images[sl].to(device)
            pix, resized, padded = preprocess(x, self.detect_size)
            with autocast(self.dtype, device):
                o = model(pixel_values=pix.to(dt))
            r = instance_postprocess(
                o.class_queries_logits,
                o.masks_queries_logits,
                resized,
                padded,
                tuple(x.shape[-2:]),
                floors[sl].to(device),
            )
            # one copy to the host per batch: image, label, score, box of every kept detection
            rows = torch.cat(
                [r["image"][:, None].float(), r["label"][:, None].float(), r["score"][:, None], r["box"]], 1
            )
            per: list[list[Detection]] = [[] for _ in range(x.shape[0])]
            for k, (i, lab, score, *box) in enumerate(rows.cpu().tolist()):
                per[int(i)].append(Detection(OBJECT_NAMES[int(lab)], tuple(box), score, mask=r["mask"][k]))
            out.extend(per)
        return out
