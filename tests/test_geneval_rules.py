"""GenEval's rules on GenEval's own prompts: rows of djghosh13/geneval ``prompts/evaluation_metadata.jsonl``
(quoted verbatim, with their line numbers) scored on hand-built detections, the expected verdicts worked out
from GenEval's ``evaluate_images.py``; its NMS IoU (inclusive pixels)."""

from __future__ import annotations

import json

import pytest
import torch

from fastcps.rewards import build_reward
from fastcps.rewards.geneval import Detection, compute_iou, filter_detections

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = {  # evaluation_metadata.jsonl, line (0-based): row
    80: '{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", '
    '"count": 1}], "prompt": "a photo of a bench and a sports ball"}',
    180: '{"tag": "counting", "include": [{"class": "backpack", "count": 2}], "exclude": [{"class": '
    '"backpack", "count": 3}], "prompt": "a photo of two backpacks"}',
    280: '{"tag": "colors", "include": [{"class": "pizza", "count": 1, "color": "purple"}], '
    '"prompt": "a photo of a purple pizza"}',
    360: '{"tag": "position", "include": [{"class": "skateboard", "count": 1}, {"class": "bird", "count": 1, '
    '"position": ["below", 0]}], "prompt": "a photo of a bird below a skateboard"}',
    460: '{"tag": "color_attr", "include": [{"class": "skis", "count": 1, "color": "red"}, {"class": "tie", '
    '"count": 1, "color": "brown"}], "prompt": "a photo of a red skis and a brown tie"}',
}
TOP, BOTTOM = (200, 40, 320, 160), (200, 330, 320, 450)  # boxes of a 512 x 512 image
LEFT, RIGHT = (20, 200, 140, 320), (370, 200, 490, 320)


def d(label, box, score=0.95, color=None):
    return {"label": label, "box": list(box), "score": score, "color": color}


CASES = [
    # (row, detections, strict verdict, partial score, why)
    (80, [d("bench", LEFT), d("sports ball", RIGHT)], 1, 1.0, "both objects"),
    (80, [d("bench", LEFT), d("sports ball", RIGHT, 0.25)], 0, 0.5, "the ball below the 0.3 threshold"),
    (180, [d("backpack", LEFT), d("backpack", RIGHT)], 1, 1.0, "two, not three"),
    (180, [d("backpack", LEFT), d("backpack", RIGHT), d("backpack", TOP)], 0, 0.5, "three: exclude fails"),
    (180, [d("backpack", LEFT), d("backpack", RIGHT, 0.85)], 0, 0.5, "counting's threshold is 0.9"),
    (180, [d("backpack", LEFT), d("backpack", RIGHT), d("backpack", TOP, 0.6)], 1, 1.0, "0.6 < 0.9: two"),
    (280, [d("pizza", LEFT, color="purple")], 1, 1.0, "purple"),
    (280, [d("pizza", LEFT, 0.5, color="purple"), d("pizza", RIGHT, 0.9, color="red")], 0, 0.0, "top is red"),
    (360, [d("skateboard", TOP), d("bird", BOTTOM)], 1, 1.0, "bird below"),
    (360, [d("skateboard", BOTTOM), d("bird", TOP)], 0, 0.5, "bird above"),
    (360, [d("skateboard", LEFT), d("bird", RIGHT)], 0, 0.5, "beside, not below"),
    (360, [d("bird", BOTTOM)], 0, 0.0, "no skateboard: no target"),
    (460, [d("skis", LEFT, color="red"), d("tie", RIGHT, color="brown")], 1, 1.0, "both colours"),
    (460, [d("skis", LEFT, color="red"), d("tie", RIGHT, color="black")], 0, 0.5, "black tie"),
]


@pytest.mark.parametrize("mode", ["strict", "partial"])
def test_genevals_rows_on_hand_built_detections(mode):
    meta = [dict(json.loads(ROWS[row]), detections=dets) for row, dets, *_ in CASES]
    r = build_reward("geneval", {"detector": "given", "score": mode})
    got = r(torch.zeros(len(CASES), 3, 8, 8), [m["prompt"] for m in meta], meta)
    want = [float(c[2] if mode == "strict" else c[3]) for c in CASES]
    assert got.tolist() == want, [(c[4], g) for c, g, w in zip(CASES, got.tolist(), want) if g != w]


def test_at_most_16_objects_a_class():
    """GenEval keeps at most MAX_OBJECTS = 16 a class: "fewer than 17" passes with 20 in the picture."""
    meta = {
        "tag": "counting",
        "include": [{"class": "cup", "count": 16}],
        "exclude": [{"class": "cup", "count": 17}],
    }
    dets = [d("cup", (k, k, k + 10, k + 10), 0.95 - k / 1000) for k in range(20)]
    r = build_reward("geneval", {"detector": "given"})
    assert r(torch.zeros(1, 3, 8, 8), ["cups"], [dict(meta, detections=dets)]).tolist() == [1.0]
    r = build_reward("geneval", {"detector": "given", "max_objects": 20})
    assert r(torch.zeros(1, 3, 8, 8), ["cups"], [dict(meta, detections=dets)]).tolist() == [0.0]


def geneval_compute_iou(box_a, box_b):
    """evaluate_images.py compute_iou."""
    area_fn = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)  # noqa: E731
    i_area = area_fn(
        [max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])]
    )
    u_area = area_fn(box_a) + area_fn(box_b) - i_area
    return i_area / u_area if u_area else 0


def test_nms_uses_genevals_iou():
    """Boxes (0, 0, 9, 9) and (5, 5, 14, 14): IoU 25/175 = 0.143 with GenEval's inclusive pixels (0.110 with
    exclusive ones); at max_overlap 0.12 GenEval drops the second box."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, b = (torch.randint(0, 30, (4,), generator=g).tolist() for _ in range(2))
        assert compute_iou(a, b) == geneval_compute_iou(a, b)
    first, second = Detection("cup", (0, 0, 9, 9), 0.9), Detection("cup", (5, 5, 14, 14), 0.8)
    assert compute_iou(first.box, second.box) == pytest.approx(25 / 175)
    assert filter_detections([first, second], 0.3, nms_threshold=0.12) == {"cup": [first]}
    assert filter_detections([first, second], 0.3, nms_threshold=0.15) == {"cup": [first, second]}
    assert filter_detections([first, second], 0.3) == {"cup": [first, second]}  # 1.0: off (GenEval's default)


# counting_edit:train (FlowCPS dataset/counting_edit/train_metadata.jsonl), a row as load_prompts gives it:
# GenEval's counting row for the edited image, its instruction as the prompt, the source image's t2i_prompt
# ("three") and paths that GenEval's rules must not read
EDIT_ROW = (
    '{"tag": "counting", "include": [{"class": "airplane", "count": 2}], "exclude": [{"class": "airplane", '
    '"count": 3}], "t2i_prompt": "a photo of three airplanes", "prompt": "Change the number of airplane '
    'in the image to two.", "image": "generated_images/image_286.jpg", '
    '"source_images": ["/data/image_286.jpg"]}'
)


@pytest.mark.parametrize("mode", ["strict", "partial"])
def test_counting_edit_rows_score_the_edited_image_as_flowcps(mode):
    """FlowCPS scores an edit with the text-to-image GenEval (rewards.py geneval_score: the prompts are
    dropped, the row's tag/include/exclude judge the edited image): two detected airplanes pass "two", three
    fail (the source's count, t2i_prompt's "three"), one fails."""
    row = json.loads(EDIT_ROW)
    plane = [d("airplane", LEFT), d("airplane", RIGHT), d("airplane", TOP)]
    meta = [dict(row, detections=plane[:2]), dict(row, detections=plane), dict(row, detections=plane[:1])]
    r = build_reward("geneval", {"detector": "given", "score": mode})
    got = r(torch.zeros(3, 3, 8, 8), [row["prompt"]] * 3, meta)
    # GenEval's partial score: the share of include/exclude rules met (three: the exclude fails; one: the
    # include fails, the exclude holds)
    assert got.tolist() == ([1.0, 0.0, 0.0] if mode == "strict" else [1.0, 0.5, 0.5])
