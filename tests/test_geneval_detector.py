"""GenEval's detector in process (``detector: mask2former``), offline on tiny random models: mmdetection 2.x's
pre- and post-processing against transcriptions of its code and against transformers' own post-processing,
masks -> pixel boxes on crafted model outputs, COCO class ids -> GenEval's names, thresholds and the cap
of 16 objects per class, batches, defaults and errors (colours: tests/test_geneval_colors.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcps.rewards import build_reward
from fastcps.rewards.geneval.mask2former import (
    COCO_RENAMED,
    OBJECT_NAMES,
    check_labels,
    instance_postprocess,
    mask2bbox,
    preprocess,
    rescale_size,
)
from fastcps.rewards.geneval.rules import filter_detections
from fastcps.testing import save_tiny_geneval, tiny_mask2former
from geneval_support import CraftedMask2Former, crafted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_geneval(tmp_path_factory.mktemp("geneval"), label="car")


# --- transcriptions of mmdetection 2.x (mmdet/core/mask/utils.py, maskformer_fusion_head.py) -------------


def mmdet_mask2bbox(masks):
    N = masks.shape[0]
    bboxes = masks.new_zeros((N, 4), dtype=torch.float32)
    x_any = torch.any(masks, dim=1)
    y_any = torch.any(masks, dim=2)
    for i in range(N):
        x = torch.where(x_any[i, :])[0]
        y = torch.where(y_any[i, :])[0]
        if len(x) > 0 and len(y) > 0:
            bboxes[i, :] = bboxes.new_tensor([x[0], y[0], x[-1] + 1, y[-1] + 1])
    return bboxes


def mmdet_instances(mask_cls, mask_pred, batch_input_shape, img_shape, ori_shape, max_per_image=100):
    """One image: Mask2FormerHead.simple_test's upsampling, MaskFormerFusionHead.simple_test's crop and
    rescale, instance_postprocess."""
    mask_pred = F.interpolate(mask_pred[None], size=batch_input_shape, mode="bilinear", align_corners=False)[
        0
    ]
    mask_pred = mask_pred[:, : img_shape[0], : img_shape[1]]
    mask_pred = F.interpolate(mask_pred[:, None], size=ori_shape, mode="bilinear", align_corners=False)[:, 0]
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[1] - 1
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    scores_per_image, top_indices = scores.flatten(0, 1).topk(max_per_image, sorted=False)
    labels_per_image = labels[top_indices]
    mask_pred = mask_pred[top_indices // num_classes]
    mask_pred_binary = (mask_pred > 0).float()
    mask_scores_per_image = (mask_pred.sigmoid() * mask_pred_binary).flatten(1).sum(1) / (
        mask_pred_binary.flatten(1).sum(1) + 1e-6
    )
    det_scores = scores_per_image * mask_scores_per_image
    mask_pred_binary = mask_pred_binary.bool()
    return labels_per_image, det_scores, mmdet_mask2bbox(mask_pred_binary), scores_per_image, mask_pred_binary


def _by_score(labels, scores, boxes, masks):
    o = torch.argsort(scores, descending=True)
    return labels[o], scores[o], boxes[o], masks[o]


def test_mask2bbox_is_mmdetections():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(7, 13, 17, generator=g) > 0.93
    masks[2] = False  # empty: zeros
    masks[3] = False
    masks[3, 4, 9] = True  # one pixel: [9, 4, 10, 5]
    assert torch.equal(mask2bbox(masks), mmdet_mask2bbox(masks))
    assert mask2bbox(masks)[3].tolist() == [9, 4, 10, 5] and mask2bbox(masks)[2].tolist() == [0, 0, 0, 0]


def test_instance_postprocess_is_mmdetections():
    """Random logits of 2 images, 6 queries, 80 classes; mask logits at stride 4 of a padded 48x80 input
    holding a 45x70 resize of a 30x47 image: ours = mmdetection's, per image."""
    g = torch.Generator().manual_seed(1)
    cls = torch.randn(2, 6, 81, generator=g) * 4
    masks = torch.randn(2, 6, 12, 20, generator=g) * 3
    args = ((45, 70), (48, 80), (30, 47))
    for floor in (0.0, 0.3):
        ours = instance_postprocess(cls, masks, *args, min_scores=torch.full((2,), floor))
        for b in range(2):
            lab, det, box, cls_score, binary = mmdet_instances(cls[b], masks[b], (48, 80), (45, 70), (30, 47))
            keep = det > floor
            want = _by_score(lab[keep], det[keep], box[keep], binary[keep])
            mine = ours["image"] == b
            got = _by_score(ours["label"][mine], ours["score"][mine], ours["box"][mine], ours["mask"][mine])
            assert len(got[0]) == int(keep.sum())
            # all 100 top pairs at floor 0; at 0.3 some pass on their class score alone, not after x mask
            assert (
                int(keep.sum()) == 100 if not floor else 0 < int(keep.sum()) < int((cls_score > floor).sum())
            )
            assert (
                torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
            )
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)


def test_instance_postprocess_agrees_with_transformers_where_that_is_exact():
    """transformers' post_process_instance_segmentation resamples masks to 384x384 (a fixed size of the hub
    checkpoints' processor); on 384x384 mask logits, no padding, 384x384 image, top-k = the queries, it
    computes what mmdetection does: same labels, scores and masks as ours."""
    from transformers import Mask2FormerImageProcessor

    g = torch.Generator().manual_seed(2)
    cls = torch.randn(1, 5, 81, generator=g) * 4
    masks = torch.randn(1, 5, 384, 384, generator=g)
    hf = Mask2FormerImageProcessor().post_process_instance_segmentation(
        SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks),
        threshold=0.0,
        return_binary_maps=True,
    )[0]
    side = (384, 384)
    ours = instance_postprocess(cls, masks, side, side, side, torch.tensor([-1.0]), max_per_image=5)
    hf_scores = torch.tensor([s["score"] for s in hf["segments_info"]])
    o, h = torch.argsort(ours["score"], descending=True), torch.argsort(hf_scores, descending=True)
    assert ours["label"][o].tolist() == [hf["segments_info"][i]["label_id"] for i in h.tolist()]
    torch.testing.assert_close(ours["score"][o], hf_scores[h], atol=1e-6, rtol=0)
    assert torch.equal(ours["mask"][o], hf["segmentation"][h].bool())


# --- preprocessing: mmdetection's test pipeline -----------------------------------------------------------


def test_rescale_size_is_mmcvs():
    # mmcv.rescale_size(old_size=(w, h), scale=(1333, 800)): scale_factor = min(1333 / long, 800 / short)
    for (h, w), want in {
        (512, 512): (800, 800),
        (1024, 1024): (800, 800),
        (768, 1360): (753, 1333),  # int(768 * 1333 / 1360 + 0.5)
        (1360, 768): (1333, 753),
        (48, 66): (800, 1100),
    }.items():
        assert rescale_size(h, w, 800, 1333) == want


def test_preprocess_is_mmdetections_test_pipeline():
    """Resize (cv2 bilinear on uint8: within one level), Normalize, then Pad(size_divisor=32) with zeros."""
    import cv2

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, 3, 48, 66), generator=g).float() / 255
    pix, resized, padded = preprocess(x, (100, 150))
    assert resized == (100, 138) and padded == (128, 160) and pix.shape == (2, 3, 128, 160)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    for b in range(2):
        hwc = (x[b] * 255).round().byte().permute(1, 2, 0).numpy()
        want = (cv2.resize(hwc, (138, 100), interpolation=cv2.INTER_LINEAR).astype(np.float64) - mean) / std
        got = pix[b].permute(1, 2, 0).numpy()
        assert np.abs(got[:100, :138] - want).max() <= 1.0 / 57.12 + 1e-5  # one 8-bit level
        assert (got[100:] == 0).all() and (got[:, 138:] == 0).all()


# --- the detector on crafted model outputs: boxes in pixels, class names, batches ------------------------


def test_detector_boxes_names_and_batches(tiny):
    """Mask logits at stride 4 cross zero halfway between cells, so a mask of low-res cells [c0, c1) (2 or
    more a side) spans pixels [4 c0, 4 c1) of the 64x96 input, [8 c0, 8 c1) of a 128x192 image resized to
    it. COCO ids 64, 65, 66 are GenEval's "computer mouse", "tv remote", "computer keyboard"."""
    r = build_reward("geneval", {**tiny, "batch_size": 2})
    det = r.detector
    outs = [
        crafted([(64, (2, 3, 6, 9)), (0, (8, 1, 15, 4))]),
        crafted([(65, (0, 0, 16, 24))]),
        crafted([(66, (5, 5, 7, 8))]),
    ]
    det._model = CraftedMask2Former(outs)
    for scale, size in ((4, (64, 96)), (8, (128, 192))):
        det._model.outputs, det._model.seen = list(outs), []
        dets = det.detect(torch.rand(3, 3, *size), [0.3, 0.3, 0.3])
        assert [p.shape for p in det._model.seen] == [(2, 3, 64, 96), (1, 3, 64, 96)]
        got = [[(d.label, d.box) for d in per] for per in dets]
        s = scale
        assert sorted(got[0]) == sorted(
            [("computer mouse", (3 * s, 2 * s, 9 * s, 6 * s)), ("person", (1 * s, 8 * s, 4 * s, 15 * s))]
        )
        assert got[1] == [("tv remote", (0, 0, 24 * s, 16 * s))] and got[2] == [
            ("computer keyboard", (5 * s, 5 * s, 8 * s, 7 * s))
        ]
        for per in dets:
            for d in per:
                assert d.mask.shape == size and mask2bbox(d.mask[None])[0].tolist() == list(d.box)
                assert 0.5 * 0.974 < d.score < 0.974  # class probability x mean mask probability
    det._model.outputs = list(outs)
    assert det.detect(torch.rand(3, 3, 64, 96), [0.3, 0.99, 0.3])[1] == []  # each image its own floor


def test_class_ids_map_to_genevals_names():
    """GenEval names class i by line i of its object_names.txt: COCO's 80 thing classes in order (as
    torchvision lists them), three renamed; every class of GenEval's metadata is one of them."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    from fastcps.prompts import load_prompts

    coco = [
        c
        for c in MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
        if c not in ("__background__", "N/A")
    ]
    assert OBJECT_NAMES == [COCO_RENAMED.get(c, c) for c in coco]
    _, meta = load_prompts("geneval:test")
    assert {r["class"] for m in meta for k in ("include", "exclude") for r in m.get(k, [])} <= set(
        OBJECT_NAMES
    )
    check_labels(dict(enumerate(coco)))  # COCO's own names, as detectron2 / the hub checkpoints name them
    check_labels({i: f"LABEL_{i}" for i in range(80)})
    swapped = dict(enumerate(coco))
    swapped[15], swapped[16] = "dog", "cat"
    with pytest.raises(ValueError, match="15: 'dog'"):
        check_labels(swapped)
    with pytest.raises(ValueError, match="133 classes"):
        check_labels({i: str(i) for i in range(133)})


def test_tiny_mask2former_end_to_end(tiny):
    """The transformers model from disk: its detections carry image-sized masks whose boxes they are, the
    class it was biased to, scores above the floor; a batch split in two gives what one image at a time
    gives."""
    r = build_reward("geneval", {**tiny, "batch_size": 2})
    r.load()  # a direct user's call: the CPU
    assert next(r.detector._model.parameters()).device.type == "cpu" and r._colors._model is not None
    x = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    batched = r.detector.detect(x, [0.3, 0.5, 0.3])
    one = [r.detector.detect(x[i : i + 1], [f])[0] for i, f in enumerate([0.3, 0.5, 0.3])]
    assert all(len(per) > 0 for per in batched)
    for per, alone, floor in zip(batched, one, [0.3, 0.5, 0.3]):
        assert [(d.label, d.box) for d in per] == [(d.label, d.box) for d in alone]
        torch.testing.assert_close(
            torch.tensor([d.score for d in per]), torch.tensor([d.score for d in alone])
        )
        for d in per:
            assert d.label == "car" and d.mask.shape == (40, 56) and d.score > floor
            assert mask2bbox(d.mask[None])[0].tolist() == list(d.box)


# --- thresholds and the cap of 16 objects a class --------------------------------------------------------


def _crafted_cars(n: int, q: int = 20):
    """n queries predicting "car" (p = 0.974) on disjoint cells of a 16x24 grid."""
    return crafted(
        [(2, (r, c, r + 1, c + 1)) for r, c in [(2 * (k // 10), 2 * (k % 10)) for k in range(n)]], q=q
    )


def test_thresholds_and_max_objects_per_class(tiny):
    """20 cars scored ~0.9: a counting prompt's threshold is 0.9, any other's 0.3; at most 16 a class are
    kept (GenEval's MAX_OBJECTS), so "fewer than 17 cars" passes with 20 in the picture."""
    r = build_reward("geneval", tiny)
    out = _crafted_cars(20)
    r.detector._model = CraftedMask2Former([out])
    scores = [d.score for d in r.detector.detect(torch.rand(1, 3, 64, 96), [0.01])[0]]
    assert len(scores) == 20 and all(0.3 < s < 0.9 for s in scores)
    meta = [
        {"tag": "counting", "include": [{"class": "car", "count": 2}]},  # 0.9: none
        {"tag": "single_object", "include": [{"class": "car", "count": 2}]},  # 0.3: all 20
        {
            "tag": "two_object",
            "include": [{"class": "car", "count": 16}],
            "exclude": [{"class": "car", "count": 17}],
        },
    ]
    r.detector._model.outputs = [out] * 3
    assert r(torch.rand(3, 3, 64, 96), ["a", "b", "c"], meta).tolist() == [0.0, 1.0, 1.0]
    assert r.last_reasons[0] == ["expected car>=2, found 0"]
    r.detector._model.outputs = [out]
    objs = filter_detections(r.detector.detect(torch.rand(1, 3, 64, 96), [0.3])[0], 0.3)
    assert len(objs["car"]) == 16 and [d.score for d in objs["car"]] == sorted(scores, reverse=True)[:16]


# --- config: defaults, files, errors ---------------------------------------------------------------------


def test_default_detector_files_and_errors(tmp_path):
    from fastcps.fetch.items import HubRepo
    from fastcps.rewards.geneval import GenEvalReward

    items = GenEvalReward.files({})
    assert [(type(i).__name__, i.key, i.repo_id) for i in items] == [
        ("HubRepo", "model", "facebook/mask2former-swin-small-coco-instance"),
        ("HubRepo", "clip_pretrained", "timm/vit_large_patch14_clip_224.openai"),
    ]
    assert isinstance(items[1], HubRepo) and items[1].required == (
        "open_clip_model.safetensors|open_clip_pytorch_model.bin",
    )
    assert GenEvalReward.files({"detector": "server", "url": "http://x"}) == []
    with pytest.raises(ValueError, match=r"rewards\[\]\.args\.detector: server"):
        build_reward("geneval", {"url": "http://127.0.0.1:1/"})
    with pytest.raises(ValueError, match="detect_size"):
        build_reward("geneval", {"detect_size": [900, 800]})
    with pytest.raises(FileNotFoundError, match=r"rewards\[\]\.args\.model"):
        build_reward("geneval", {"model": str(tmp_path / "none")}).load("cpu")
    with pytest.raises(ValueError, match="no pretrained tag 'opneai'"):
        GenEvalReward.files({"clip_pretrained": "opneai"})
    tiny_mask2former(num_queries=3).save_pretrained(tmp_path / "m")  # loads with LABEL_i names
