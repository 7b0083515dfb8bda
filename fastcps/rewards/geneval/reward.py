"""The ``geneval`` reward: GenEval's detector (or detections from elsewhere) and GenEval's rules."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

import torch

from fastcps.rewards import DType, RewardArgs
from fastcps.rewards._util import check_inputs, resolve_device, to_uint8
from fastcps.rewards.geneval.detectors import GivenDetector, ServerDetector
from fastcps.rewards.geneval.mask2former import DEFAULT_MODEL, DETECT_SIZE
from fastcps.rewards.geneval.rules import Detection, color_requests, evaluate, filter_detections

__all__ = ["GenEvalReward"]

logger = logging.getLogger("fastcps.rewards.geneval")
DETECTORS = ("mask2former", "server", "given")


class GenEvalReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` in [0, 1] (fp32).

    ``last_reasons`` keeps the failure reasons of the last batch, one list per image. Args: see ``Args``.
    """

    name = "geneval"

    class Args(RewardArgs):
        detector: Literal["mask2former", "server", "given"] = "mask2former"
        """`mask2former`: GenEval's detector and colour classifier in this process (`model`, `clip_*`);
        `server`: a detection server at `url`; `given`: detections in the prompts' metadata."""
        model: str = DEFAULT_MODEL
        """Mask2Former COCO instance-segmentation model (transformers), path or hub id."""
        clip_model: str = "ViT-L-14"
        """open_clip architecture of the colour classifier (GenEval's)."""
        clip_pretrained: str = "openai"
        """open_clip pretrained tag (GenEval: `openai`) or a local checkpoint file (OpenAI's weights in a
        file: set `clip_model` to `ViT-L-14-quickgelu`, the activation they were trained with)."""
        clip_config: dict | str | None = None
        """open_clip model config (dict or .json path) instead of `clip_model` (tests use a tiny one)."""
        detect_size: tuple[int, int] = DETECT_SIZE
        """[short, long] side limits of the detector's input (mmdetection's test scale: [800, 1333])."""
        device: str | None = None
        """None = the images' device."""
        dtype: DType = "float32"
        """Mask2Former's precision: float32 (GenEval's) | bfloat16 | float16 | amp; half is for CUDA."""
        clip_dtype: DType = "amp"
        """The colour classifier's: amp (GenEval's: fp32 weights, fp16 autocast on CUDA) | float32 | ..."""
        batch_size: int = 8
        """Images per Mask2Former forward (crops per CLIP forward: 16, as GenEval)."""
        url: str | None = None
        """Detection server of `detector: server`; None = env FASTCPS_GENEVAL_URL."""
        timeout: float = 120.0
        """Seconds per server request."""
        score: Literal["strict", "partial"] = "strict"
        """`strict`: 1 when every rule passes, else 0; `partial`: the fraction of rules that pass."""
        threshold: float = 0.3
        """Detections scored above this count."""
        counting_threshold: float = 0.9
        """`threshold` of prompts tagged `counting`."""
        max_objects: int = 16
        """Detections kept per class, highest score first."""
        nms_threshold: float = 1.0
        """IoU of non-maximum suppression; 1.0 = off."""
        position_threshold: float = 0.1
        """Offset shrink (x the summed box sizes) of the relative-position checks."""

    def __init__(
        self,
        detector="mask2former",
        model: str = DEFAULT_MODEL,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        clip_config: dict | str | None = None,
        detect_size=DETECT_SIZE,
        device=None,
        dtype: str | None = "float32",
        clip_dtype: str | None = "amp",
        batch_size: int = 8,
        url: str | None = None,
        timeout: float = 120.0,
        score: str = "strict",
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        nms_threshold: float = 1.0,
        position_threshold: float = 0.1,
    ):
        if score not in ("strict", "partial"):
            raise ValueError(
                f"reward 'geneval': config key rewards[].args.score must be 'strict' or "
                f"'partial', got {score!r}"
            )
        if detector not in DETECTORS and not hasattr(detector, "detect"):
            raise ValueError(
                f"reward 'geneval': config key rewards[].args.detector must be one of {DETECTORS}, "
                f"got {detector!r}"
            )
        if url is not None and detector != "server":
            raise ValueError(
                f"reward 'geneval': config key rewards[].args.url is set but the detector is {detector!r} "
                "(the default is GenEval's Mask2Former in process); set rewards[].args.detector: server to "
                "score with your detection server"
            )
        self.detector_spec, self.url, self.timeout = detector, url, float(timeout)
        self.score = score
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.nms_threshold = int(max_objects), float(nms_threshold)
        self.position_threshold = float(position_threshold)
        self.device = device
        self._detector = self._colors = None
        if detector == "mask2former":
            from fastcps.rewards.geneval.colors import ColorClassifier
            from fastcps.rewards.geneval.mask2former import Mask2FormerDetector

            self._detector = Mask2FormerDetector(model, device, dtype, batch_size, detect_size)
            self._colors = ColorClassifier(clip_model, clip_pretrained, clip_config, device, clip_dtype)
            if os.environ.get("FASTCPS_GENEVAL_URL"):
                logger.warning(
                    "geneval: FASTCPS_GENEVAL_URL is set but the detector is mask2former (in process); "
                    "set rewards[].args.detector: server to use the server"
                )
        self.last_reasons: list[list[str]] = []

    @classmethod
    def files(cls, args: dict) -> list:
        """``mask2former``: the Mask2Former repo (or path) and the CLIP weights of ``clip_pretrained``;
        ``server`` / ``given``: nothing (detection runs elsewhere)."""
        from fastcps.fetch.items import LocalPath, local_or_hub, transformers_model
        from fastcps.rewards.geneval.colors import clip_checkpoint_item

        a = cls.Args.model_validate(args)
        if a.detector != "mask2former":
            return []
        items = [
            local_or_hub(a.model, "model", "Mask2Former COCO instance segmentation", transformers_model),
            clip_checkpoint_item(a.clip_model, a.clip_pretrained),
        ]
        if isinstance(a.clip_config, str):
            items.append(LocalPath(a.clip_config, "clip_config", "open_clip model config"))
        return items

    def load(self, device=None) -> None:
        """Load the models now (``mask2former``; on ``device`` unless the reward's own ``device`` is set),
        or check the server URL (``server``): failures at start-up, not at the first reward."""
        det = self.detector
        if self._colors is not None:
            device = device if device is not None else "cpu"
            det.load(device)
            self._colors.load(device)

    @property
    def detector(self):
        if self._detector is None:
            spec = self.detector_spec
            if spec == "given":
                self._detector = GivenDetector()
            elif spec == "server":
                url = self.url or os.environ.get("FASTCPS_GENEVAL_URL")
                if not url:
                    raise ValueError(
                        "reward 'geneval': no detection server; set config key "
                        "rewards[].args.url (or env FASTCPS_GENEVAL_URL), or "
                        "rewards[].args.detector: mask2former (in process)"
                    )
                self._detector = ServerDetector(url, self.timeout)
            else:
                self._detector = spec
        return self._detector

    def threshold_of(self, meta: dict) -> float:
        # evaluate_image: confidence_threshold = THRESHOLD if metadata['tag'] != "counting"
        # else COUNTING_THRESHOLD
        return self.counting_threshold if meta.get("tag") == "counting" else self.threshold

    def score_detections(self, detections: list[Detection], meta: dict) -> tuple[float, list[str]]:
        objects = filter_detections(detections, self.threshold_of(meta), self.max_objects, self.nms_threshold)
        return self._score(objects, meta)

    def _score(self, objects: dict[str, list[Detection]], meta: dict) -> tuple[float, list[str]]:
        ok, passed, total, reasons = evaluate(objects, meta, self.position_threshold)
        if self.score == "strict":
            return float(ok), reasons
        return (passed / total if total else 1.0), reasons

    def _attach_colors(self, images: torch.Tensor, objects: list[dict], metadata: list[dict]) -> None:
        """Colour the objects GenEval's rules classify (``rules.color_requests``), no others: one CLIP
        pass per class over the batch's crops."""
        jobs: dict[tuple[int, str], int] = {}
        for i, (objs, meta) in enumerate(zip(objects, metadata)):
            for cls, found in color_requests(objs, meta):
                jobs[(i, cls)] = max(jobs.get((i, cls), 0), len(found))
        if not jobs:
            return
        from fastcps.rewards.geneval.colors import crop_object

        levels = to_uint8(images)
        requests = [
            (cls, [crop_object(levels[i], d.box, d.mask) for d in objects[i][cls][:n]])
            for (i, cls), n in jobs.items()
        ]
        colors = self._colors.classify(requests, resolve_device(self.device, images))
        for ((i, cls), n), cols in zip(jobs.items(), colors):
            objs = objects[i][cls]
            objs[:n] = [dataclasses.replace(d, color=c) for d, c in zip(objs[:n], cols)]

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        check_inputs(self.name, images, prompts, metadata)
        if metadata is None or any(not m or ("include" not in m and "exclude" not in m) for m in metadata):
            raise ValueError(
                "reward 'geneval' needs GenEval metadata per prompt ({'tag', 'include', "
                "'exclude'}); use a .jsonl prompt file with a 'metadata' field"
            )
        det = self.detector
        thresholds = [self.threshold_of(m) for m in metadata]
        if self._colors is not None:
            dets = det.detect(images, thresholds)
        elif isinstance(det, ServerDetector):
            dets = det.detect(images, metadata, prompts)
        else:
            dets = det.detect(images, metadata)
        if len(dets) != images.shape[0]:
            raise RuntimeError(
                f"reward 'geneval': detector returned {len(dets)} lists for {images.shape[0]} images"
            )
        objects = [
            filter_detections(d, thr, self.max_objects, self.nms_threshold)
            for d, thr in zip(dets, thresholds)
        ]
        if self._colors is not None:
            self._attach_colors(images, objects, metadata)
        scores, self.last_reasons = [], []
        for objs, m in zip(objects, metadata):
            s, why = self._score(objs, m)
            scores.append(s)
            self.last_reasons.append(why)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
