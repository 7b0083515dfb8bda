"""GenEval's rules on detections, as its evaluator applies them (djghosh13/geneval
``evaluation/evaluate_images.py``, ``evaluate_image`` and ``evaluate``; the lines followed are quoted).

Per prompt, the metadata is a row of GenEval's ``prompts/evaluation_metadata.jsonl``::

    {"tag": "counting" | "single_object" | "two_object" | "colors" | "position" | "color_attr",
     "include": [{"class": "dog", "count": 2, "color"?: "red", "position"?: ["left of", 0]}, ...],
     "exclude": [{"class": "dog", "count": 3}, ...]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "COLORS",
    "RELATIONS",
    "Detection",
    "color_requests",
    "compute_iou",
    "evaluate",
    "filter_detections",
    "relative_position",
]

# evaluate_images.py: COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
# "black", "white"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (pixels; y grows downwards)
    score: float = 1.0
    color: str | None = None
    # the instance mask (bool [H, W], any device) where the detector gives one: the colour crop needs it
    mask: object = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> Detection:
        try:
            box = tuple(float(v) for v in d["box"])
            if len(box) != 4:
                raise ValueError(f"box needs 4 numbers, got {len(box)}")
            return cls(str(d["label"]), box, float(d.get("score", 1.0)), d.get("color"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"geneval: bad detection {d!r} ({err}); expected "
                "{'label', 'box': [x1, y1, x2, y2], 'score', 'color'?}"
            ) from err


def compute_iou(a, b) -> float:
    """GenEval's ``compute_iou``, with its inclusive pixel convention (+1 on each side):
    ``area_fn = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)``."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0


def filter_detections(
    dets: list[Detection], threshold: float, max_objects: int = 16, nms_threshold: float = 1.0
) -> dict[str, list[Detection]]:
    """Class -> kept detections, highest score first; ``evaluate_image``::

    ordering = np.argsort(bbox[index][:, 4])[::-1]
    ordering = ordering[bbox[index][ordering, 4] > confidence_threshold] # Threshold
    ordering = ordering[:MAX_OBJECTS].tolist() # Limit number of detected objects per class
    while ordering:
        max_obj = ordering.pop(0)
        detected[classname].append(...)
        ordering = [obj for obj in ordering if NMS_THRESHOLD == 1 or
                    compute_iou(bbox[index][max_obj], bbox[index][obj]) < NMS_THRESHOLD]
    """
    by_class: dict[str, list[Detection]] = {}
    for d in dets:
        by_class.setdefault(d.label, []).append(d)
    out = {}
    for cls, ds in by_class.items():
        order = sorted((d for d in ds if d.score > threshold), key=lambda d: -d.score)[:max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if nms_threshold != 1:
                order = [d for d in order if compute_iou(best.box, d.box) < nms_threshold]
        if kept:
            out[cls] = kept
    return out


def relative_position(a: Detection, b: Detection, position_threshold: float = 0.1) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"), GenEval's rule::

    center_a, center_b = boxes.mean(axis=-2); dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3): return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    if dx < -0.5: "left of"; if dx > 0.5: "right of"; if dy < -0.5: "above"; if dy > 0.5: "below"
    """
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    dim_a = (abs(a.box[2] - a.box[0]), abs(a.box[3] - a.box[1]))
    dim_b = (abs(b.box[2] - b.box[0]), abs(b.box[3] - b.box[1]))
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = [
        max(abs(o) - position_threshold * (da + db), 0.0) * math.copysign(1.0, o) if o != 0 else 0.0
        for o, da, db in zip(off, dim_a, dim_b)
    ]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate(
    objects: dict[str, list[Detection]], metadata: dict, position_threshold: float = 0.1
) -> tuple[bool, int, int, list[str]]:
    """GenEval's ``evaluate``: (all rules pass, rules passed, rules, reasons) for kept detections.

    Each include checks its class's ``count`` highest-scored objects (``objects.get(classname, [])
    [:req['count']]``): enough of them, all of ``color`` (``colors.count(req['color']) < req['count']``
    fails), each in ``relation`` to every object of the include it points at (only when the earlier
    checks passed, ``if 'position' in req and matched``); an exclude fails with ``count`` or more objects.
    """
    reasons: list[str] = []
    passed = total = 0
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        total += 1
        cls, count = req["class"], int(req["count"])
        found = objects.get(cls, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if any(c is None for c in colors):
                    raise ValueError(
                        f"geneval: prompt needs a {req['color']} {cls} but the detector gives "
                        "no colours (the detection server must return 'color')"
                    )
                if colors.count(req["color"]) < count:
                    ok = False
                    reasons.append(
                        f"expected {req['color']} {cls}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}"
                    )
            if "position" in req and ok:
                rel, target = req["position"][0], int(req["position"][1])
                if rel not in RELATIONS:
                    raise ValueError(f"geneval: unknown relation {rel!r}; one of {RELATIONS}")
                group = matched_groups[target] if target < len(matched_groups) else None
                if group is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in group:
                            true_rels = relative_position(obj, tgt, position_threshold)
                            if rel not in true_rels:
                                ok = False
                                reasons.append(
                                    f"expected {cls} {rel} target, found "
                                    f"{' and '.join(sorted(true_rels)) or 'no relation to'} target"
                                )
                                break
                        if not ok:
                            break
        matched_groups.append(found if ok else None)
        passed += ok
    for req in metadata.get("exclude", []):
        total += 1
        cls, count = req["class"], int(req["count"])
        if len(objects.get(cls, [])) >= count:
            reasons.append(f"expected {cls}<{count}, found {len(objects[cls])}")
        else:
            passed += 1
    return passed == total, passed, total, reasons


def color_requests(objects: dict[str, list[Detection]], metadata: dict) -> list[tuple[str, list[Detection]]]:
    """The (class, objects) GenEval classifies colours of: each include with ``color`` whose class has its
    ``count`` objects (``evaluate`` calls ``color_classification(image, found_objects, classname)`` only
    then), the ``count`` highest-scored ones."""
    out = []
    for req in metadata.get("include", []):
        found = objects.get(req["class"], [])[: int(req["count"])]
        if "color" in req and len(found) >= int(req["count"]):
            out.append((req["class"], found))
    return out
