"""``geneval``: GenEval's rule-based scoring (Ghosh et al. 2023) of object detections.

Detection (``args.detector``):

- ``"mask2former"`` (default): GenEval's evaluator in this process, no server: Mask2Former COCO instance
  segmentation through transformers (``args.model``, default ``facebook/mask2former-swin-small-coco-
  instance``, the Swin-S model family of GenEval's mmdetection checkpoint) with mmdetection 2.x's pre- and
  post-processing (``mask2former.py``), and GenEval's colour classifier, open_clip ViT-L-14 ``openai``
  zero-shot on each object's masked crop over grey ``#999`` (``colors.py``), run only on the objects a
  colour rule checks. ``device`` / ``dtype`` (Mask2Former, float32 as GenEval) / ``clip_dtype`` (amp, as
  GenEval) / ``batch_size`` as the other model rewards; ``python -m fastcps.fetch`` downloads both models.
- ``"server"``: an HTTP detection server at ``args.url`` (or env ``FASTCPS_GENEVAL_URL``), ``timeout`` s
  per request (protocol in ``detectors.py``).
- ``"given"``: ``metadata[i]["detections"]`` (tests, detections computed elsewhere).

Rules (``rules.py``, as GenEval's ``evaluate_images.py``): detections of each class are kept when their
score is above ``threshold`` (0.3; ``counting_threshold`` 0.9 for ``tag == "counting"``), highest first, at
most ``max_objects`` (16) per class, with optional per-class NMS (``nms_threshold`` 1.0 = off, GenEval's
default). Each ``include`` needs ``count`` objects of its class (the highest-scored ``count`` are checked);
with ``color`` all of them must have that colour; with ``position: [relation, j]`` each of them must stand in
``relation`` to every object matched by include ``j``, on box centres after shrinking the offset by
``position_threshold`` (0.1) x the summed box sizes. Each ``exclude`` fails when ``count`` or more objects of
its class are found.

Score (``args.score``): ``"strict"`` (default) = 1 if every rule passes else 0, GenEval's metric;
``"partial"`` = the fraction of rules (each include and each exclude entry is one rule) that pass, a denser
training signal.
"""

from fastcps.rewards.geneval.detectors import Detector, GivenDetector, ServerDetector
from fastcps.rewards.geneval.reward import GenEvalReward
from fastcps.rewards.geneval.rules import (
    COLORS,
    Detection,
    compute_iou,
    evaluate,
    filter_detections,
    relative_position,
)

__all__ = [
    "COLORS",
    "Detection",
    "Detector",
    "GenEvalReward",
    "GivenDetector",
    "ServerDetector",
    "compute_iou",
    "evaluate",
    "filter_detections",
    "relative_position",
]
