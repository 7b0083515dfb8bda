"""GenEval's colour classification in process: the crop against GenEval's PIL code, the zero-shot classifier
against clip_benchmark's, the tag's QuickGELU model, colours computed only where a colour rule needs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcps.rewards import build_reward
from fastcps.rewards.geneval.colors import BACKGROUND, ColorClassifier, crop_object
from fastcps.rewards.geneval.mask2former import mask2bbox
from fastcps.rewards.geneval.rules import COLORS
from fastcps.testing import TINY_GENEVAL_CLIP, save_tiny_geneval
from geneval_support import CraftedMask2Former, crafted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_geneval(tmp_path_factory.mktemp("geneval"), label="car")


def geneval_crop(image, box, mask, bgcolor="#999"):
    """evaluate_images.py ImageCrops.__init__ / __getitem__ (options bgcolor "#999", crop "1")."""
    from PIL import Image

    _image = image.convert("RGB")
    _blank = Image.new("RGB", image.size, color=bgcolor)
    if mask is not None:
        assert tuple(_image.size[::-1]) == tuple(mask.shape)
        image = Image.composite(_image, _blank, Image.fromarray(mask))
    else:
        image = _image
    return image.crop(tuple(box[:4]))  # PIL 9.4 (GenEval's) took box[:4], a numpy row; PIL 12 a tuple


def test_crop_is_genevals():
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, 256, (3, 37, 53), generator=g, dtype=torch.uint8)
    mask = torch.rand(37, 53, generator=g) > 0.6
    mask[:, :7], mask[:, 45:], mask[30:] = False, False, False  # a box inside the image
    box = mask2bbox(mask[None])[0]
    row = np.array([*box.tolist(), 0.9], dtype=np.float32)  # mmdetection's bbox row: x1, y1, x2, y2, score
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    for m in (mask, None):
        want = np.array(geneval_crop(pil, row, None if m is None else m.numpy()))
        got = crop_object(img, box.tolist(), m)
        assert got.shape == want.shape == (int(box[3] - box[1]), int(box[2] - box[0]), 3)
        assert np.array_equal(got, want)
    assert (
        BACKGROUND == (153, 153, 153)
        and (
            crop_object(img, box.tolist(), mask)[
                ~mask[box[1].int() : box[3].int(), box[0].int() : box[2].int()].numpy()
            ]
            == 153
        ).all()
    )


def zero_shot_classifier(model, tokenizer, classnames, templates):
    """clip_benchmark 1.4.0 metrics/zeroshot_classification.py (CPU: its autocast does nothing)."""
    zeroshot_weights = []
    for classname in classnames:
        texts = [template.format(c=classname) for template in templates]
        class_embeddings = model.encode_text(tokenizer(texts))
        class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
        class_embedding /= class_embedding.norm()
        zeroshot_weights.append(class_embedding)
    return torch.stack(zeroshot_weights, dim=1)


def test_colour_classifier_is_genevals_zero_shot(tiny):
    """GenEval's templates (f"a photo of a {{c}} {classname}", ...), clip_benchmark's classifier and
    ``100. * normalize(image_features) @ classifier`` argmax, on the tiny CLIP."""
    import open_clip
    from PIL import Image

    clf = ColorClassifier(
        clip_pretrained=tiny["clip_pretrained"], clip_config=TINY_GENEVAL_CLIP, batch_size=3
    )
    clf.load("cpu")
    model, tok = clf._model, open_clip.SimpleTokenizer()
    transform = open_clip.image_transform(
        32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    g = np.random.default_rng(6)
    crops = {
        "car": [g.integers(0, 256, (20 + 3 * k, 30 - k, 3), dtype=np.uint8) for k in range(5)],
        "tv remote": [g.integers(0, 256, (9, 40, 3), dtype=np.uint8)],
    }
    got = clf.classify(
        [("car", crops["car"][:2]), ("tv remote", crops["tv remote"]), ("car", crops["car"][2:])], "cpu"
    )
    with torch.no_grad():
        for classname, colours in (("car", got[0] + got[2]), ("tv remote", got[1])):
            templates = [
                f"a photo of a {{c}} {classname}",
                f"a photo of a {{c}}-colored {classname}",
                "a photo of a {c} object",
            ]
            want_clf = zero_shot_classifier(model, tok, COLORS, templates)
            torch.testing.assert_close(clf.classifier(classname, torch.device("cpu")), want_clf)
            pix = torch.stack([transform(Image.fromarray(c)) for c in crops[classname]])
            logits = 100.0 * F.normalize(model.encode_image(pix), dim=-1) @ want_clf
            assert colours == [COLORS[i] for i in logits.argmax(1).tolist()]
    assert set(clf._classifiers) == {
        "car",
        "tv remote",
    }  # one text pass a class, as GenEval's COLOR_CLASSIFIERS


def test_genevals_tag_builds_openais_quickgelu_model():
    """open_clip 3 builds the plain ViT config (GELU) for tag "openai"; GenEval's open_clip 2.20 built
    OpenAI's QuickGELU model: the tag's quick_gelu is forced (ViT-B-32 stands in for ViT-L-14: same tag)."""
    from open_clip.transformer import QuickGELU

    model, _, _ = ColorClassifier(clip_model="ViT-B-32", clip_pretrained="openai")._build()
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_colours_only_where_a_colour_rule_needs_them(tiny):
    """Three images, one CLIP call: the colours prompt's one car and the color_attr prompt's two
    classes' top objects are classified, crops of the right detections; the counting prompt's cars are
    not, nor a colour prompt's class that is missing."""
    r = build_reward("geneval", tiny)
    outs = [
        crafted([(2, (1, 1, 5, 5)), (2, (8, 8, 12, 20))]),
        crafted([(2, (1, 1, 5, 5)), (2, (8, 8, 12, 20))]),
        crafted([(2, (0, 0, 4, 4)), (17, (6, 6, 12, 12))]),
    ]
    r.detector._model = CraftedMask2Former(list(outs))
    calls, classify = [], r._colors.classify
    r._colors.classify = lambda req, dev: calls.append(req) or classify(req, dev)
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    meta = [
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
        {"tag": "single_object", "include": [{"class": "car", "count": 2}]},
        {
            "tag": "color_attr",
            "include": [
                {"class": "car", "count": 1, "color": "blue"},
                {"class": "horse", "count": 1, "color": "brown"},
                {"class": "dog", "count": 1, "color": "red"},
            ],
        },
    ]
    s = r(x, ["a", "b", "c"], meta)
    assert len(calls) == 1 and [(c, len(crops)) for c, crops in calls[0]] == [
        ("car", 1),
        ("car", 1),
        ("horse", 1),
    ]
    r.detector._model.outputs = list(outs)
    dets = r.detector.detect(x, [0.3] * 3)
    levels = (x * 255).round().byte()
    tops = [
        max(dets[0], key=lambda d: d.score),
        [d for d in dets[2] if d.label == "car"][0],
        [d for d in dets[2] if d.label == "horse"][0],
    ]
    for crop, (i, d) in zip([c[0] for _, c in calls[0]], zip([0, 2, 2], tops)):
        assert np.array_equal(crop, crop_object(levels[i], d.box, d.mask))
    colours = r._colors.classify(calls[0], "cpu")
    assert s[0].item() == float(colours[0] == ["red"]) and s[1].item() == 1.0 and s[2].item() == 0.0  # no dog
